"""Writes the Colab notebooks colab/<name>.ipynb from their sources colab/<name>.py (jupytext "py:percent" text,
which is what we edit and what the tests run), without outputs and byte for byte reproducible.

    python tools/make_notebooks.py           # (re)writes every colab/*.ipynb
    python tools/make_notebooks.py --check   # exit 1, naming each notebook that is missing or differs from its source

Needs jupytext (the `dev` extra).
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"


def notebook_text(source: pathlib.Path) -> str:
    """The .ipynb JSON of one source: cells in order, stable cell ids, Colab's metadata, no outputs."""
    import jupytext

    notebook = jupytext.read(source, fmt="py:percent")
    for index, cell in enumerate(notebook.cells):
        cell["id"] = f"{source.stem}-{index:02d}"  # nbformat draws random ids; ours keep --check reproducible
        if cell["cell_type"] == "code":
            cell["execution_count"] = None
            cell["outputs"] = []
    notebook.metadata = {
        "colab": {"name": f"{source.stem}.ipynb", "provenance": []},
        "kernelspec": {"display_name": "Python 3", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return jupytext.writes(notebook, fmt="ipynb").rstrip("\n") + "\n"


def stale(sources: list[pathlib.Path]) -> list[pathlib.Path]:
    """The notebooks that are missing or differ from what their sources give."""
    return [source.with_suffix(".ipynb") for source in sources
            if not source.with_suffix(".ipynb").is_file()
            or source.with_suffix(".ipynb").read_text(encoding="utf-8") != notebook_text(source)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a notebook is stale")
    parser.add_argument("--dir", default=str(COLAB), help="the folder of <name>.py sources (default colab/)")
    args = parser.parse_args(argv)
    sources = sorted(pathlib.Path(args.dir).glob("*.py"))
    if not sources:
        print(f"no .py sources in {args.dir}", file=sys.stderr)
        return 2
    if args.check:
        outdated = stale(sources)
        for notebook in outdated:
            print(f"{notebook} is stale: run python tools/make_notebooks.py", file=sys.stderr)
        return 1 if outdated else 0
    for source in sources:
        notebook = source.with_suffix(".ipynb")
        notebook.write_text(notebook_text(source), encoding="utf-8")
        print(f"wrote {notebook}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
