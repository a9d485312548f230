"""The Colab demos (colab/<name>.py, jupytext text; colab/<name>.ipynb generated from them) run headless as plain
scripts, as a user's checkout would run them, on the tests' micro towers for a few steps: their Colab-only cells do
nothing there and everything else must work and write what it shows."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# A few steps of the micro towers, a small eval set. The session's XLA_FLAGS (8 fake devices) and persistent
# compilation cache come from os.environ (tests/conftest.py): the zero-shot demo's and the tour's CLIP read back the
# programs the quickstart compiled.
TINY = {"VLP_DEMO_STEPS": str(STEPS), "VLP_DEMO_BATCH": "16", "VLP_DEMO_EVAL": "32", "VLP_DEMO_TOWERS": "micro",
        "VLP_DEMO_IMAGES": "6"}


def run_demo(name: str, workdir: Path, **env: str) -> str:
    """Runs colab/<name>.py headless from the repository root; returns its stdout."""
    result = subprocess.run(
        [sys.executable, f"colab/{name}.py"], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
        timeout=600, env={**os.environ, **TINY,  # conftest's XLA_FLAGS: 8 devices, the cheapest compile
                          "VLP_DEMO_WORKDIR": str(workdir), "PYTHONIOENCODING": "utf-8", **env},
    )
    assert result.returncode == 0, f"colab/{name}.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def test_quickstart_trains_plots_the_loss_and_prints_retrieval(tmp_path):
    out = run_demo("quickstart", tmp_path)
    run = tmp_path / "quickstart"
    report = json.loads((run / "eval" / f"step_{STEPS}.json").read_text())
    printed = re.search(r"^mean R@1: ([0-9.]+)$", out, re.MULTILINE)
    assert printed, out
    assert float(printed.group(1)) == pytest.approx(report["sets"]["embedded"]["retrieval"]["mean_r1"], abs=0.01)
    assert (run / "eval" / report["picture"]).stat().st_size > 0  # the retrieval picture
    # The loss curve's data: every logged step of metrics.jsonl; the plot itself only where matplotlib is.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["train/loss"]) for r in logged if "train/loss" in r]
    rows = (run / "loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and len(rows) == len(logged) + 1 == STEPS + 1
    for row, (step, loss) in zip(rows[1:], logged, strict=True):
        assert int(row.split("\t")[0]) == step and float(row.split("\t")[1]) == pytest.approx(loss, rel=1e-5)
    assert f"loss: {logged[0][1]:.3f} at step {logged[0][0]}" in out
    # Image->text: each shown scene with its top 3 captions, marked hit or miss.
    for index in range(4):
        assert f"scene{index}.png, truly: " in out
    assert len(re.findall(r"^  [123]\. [✓✗] ", out, re.MULTILINE)) == 12
    assert len((run / "retrieval" / "out" / "texts.txt").read_text().splitlines()) == 32 * 5  # 5 captions a scene


def test_zeroshot_trains_a_model_and_classifies_a_folder_of_images(tmp_path):
    out = run_demo("zeroshot", tmp_path)  # as in Colab: no VLP_DEMO_RUN, so it trains its own tiny CLIP first
    demo = tmp_path / "zeroshot"
    assert re.search(r"^trained .*zeroshot/run: held-out mean R@1 [0-9.]+$", out, re.MULTILINE), out
    assert (demo / "run" / "checkpoints" / str(STEPS)).is_dir()
    classes = (demo / "classes.txt").read_text().splitlines()
    assert len(classes) == 40 and "red circle" in classes  # 8 colours x 5 shapes
    images = sorted(path.name for path in (demo / "images").iterdir())
    assert images == [f"image{i:02d}.png" for i in range(6)]
    lines = [json.loads(line) for line in (demo / "out" / "zeroshot.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == images == (demo / "out" / "image_ids.txt").read_text().splitlines()
    for line in lines:
        names, scores = zip(*line["top"], strict=True)
        assert len(names) == 5 == len(set(names)) and set(names) <= set(classes)
        assert list(scores) == sorted(scores, reverse=True)
        assert re.search(rf"^{line['image']} \(truly [a-z]+ [a-z]+\): ", out, re.MULTILINE)
    assert re.search(r"^zero-shot over 6 images: top-1 \d+%, top-5 \d+%", out, re.MULTILINE), out
    assert "put ViT-B-32.safetensors" not in out  # the imported-weights cell is Colab-only


def test_methods_tour_prints_a_row_per_method(tmp_path):
    out = run_demo("methods_tour", tmp_path, VLP_DEMO_METHODS="clip,cookie")
    results = json.loads((tmp_path / "methods_tour" / "tour.json").read_text())
    assert list(results) == ["clip", "cookie"]
    for name, row in results.items():
        report = json.loads((tmp_path / "methods_tour" / name / "eval" / f"step_{STEPS}.json").read_text())
        figures = report["sets"]["embedded"]
        assert row["mean_r1"] == pytest.approx(figures["retrieval"]["mean_r1"])
        assert row["t2t_r1"] == pytest.approx(figures["unimodal"]["t2t_r1"])  # the unimodal figures
        cells = re.search(rf"^\| {name} \| (.*) \|$", out, re.MULTILINE)
        assert cells, out
        assert cells.group(1).split(" | ")[0] == f"{row['mean_r1']:.1f}"
        assert row["reranked_mean_r1"] is None  # only CMAL re-ranks
    assert "cots" not in (tmp_path / "methods_tour" / "tour.md").read_text()


def test_notebooks_are_generated_from_their_sources():
    result = subprocess.run([sys.executable, "tools/make_notebooks.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(path.stem for path in (ROOT / "colab").glob("*.ipynb")) == ["methods_tour", "quickstart",
                                                                                "zeroshot"]


def test_make_notebooks_check_names_a_stale_notebook(tmp_path):
    source = tmp_path / "demo.py"
    source.write_text("# %% [markdown]\n# # A demo\n\n# %%\nprint(1)\n", encoding="utf-8")
    tool = [sys.executable, "tools/make_notebooks.py", f"--dir={tmp_path}"]
    subprocess.run(tool, cwd=ROOT, check=True, capture_output=True)
    notebook = json.loads((tmp_path / "demo.ipynb").read_text())
    assert [cell["cell_type"] for cell in notebook["cells"]] == ["markdown", "code"]
    assert notebook["cells"][1]["source"] == ["print(1)"] and notebook["cells"][1]["outputs"] == []
    assert subprocess.run([*tool, "--check"], cwd=ROOT).returncode == 0
    source.write_text(source.read_text() + "print(2)\n", encoding="utf-8")
    stale = subprocess.run([*tool, "--check"], cwd=ROOT, capture_output=True, text=True)
    assert stale.returncode == 1 and "demo.ipynb is stale" in stale.stderr
