"""Checks dataset directories against their manifests: every shard's size and sha256, recomputed by streaming.

    python -m vlp_jax.data.verify DIR [DIR ...]

One line per shard (ok / MISMATCH / missing) and a summary per directory. Exit status 0 when every shard matches,
1 when one does not, 2 when an argument is not a readable dataset directory. Opening a dataset for training checks
only the sizes; run this after copying a dataset or when training logs `corrupt_shard` skips.
"""

import sys

from etils import epath

from vlp_jax.data import records

USAGE = "usage: python -m vlp_jax.data.verify DIR [DIR ...]"


def verify_dir(data_dir: epath.Path, manifest: dict) -> int:
    """Prints one line per shard of ``data_dir`` and a summary; returns how many shards are bad."""
    counts = {"ok": 0, "MISMATCH": 0, "missing": 0}
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            problem = records.shard_problem(data_dir, shard)
            status = "ok" if problem is None else "missing" if problem == "missing" else "MISMATCH"
            counts[status] += 1
            detail = f" ({problem})" if status == "MISMATCH" else ""
            print(f"{status:8} {data_dir / shard['file']} [{split}]{detail}", flush=True)
    bad = counts["MISMATCH"] + counts["missing"]
    total = sum(counts.values())
    verdict = "all match the manifest" if not bad else "re-copy the bad shards or re-run the converter"
    print(f"{data_dir}: {total} shards, {counts['ok']} ok, {counts['MISMATCH']} mismatched, "
          f"{counts['missing']} missing: {verdict}")
    return bad


def main(argv: list[str] | None = None) -> int:
    """Verifies every directory named in ``argv``; returns the exit status (0 all ok, 1 a bad shard, 2 bad usage)."""
    dirs = sys.argv[1:] if argv is None else argv
    if dirs in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not dirs or any(d.startswith("-") for d in dirs):
        print(USAGE, file=sys.stderr)
        return 2
    manifests = []
    for name in dirs:  # every argument is checked before any shard is read
        try:
            manifests.append((epath.Path(name), records.read_manifest(name)))
        except records.ManifestError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    bad = sum(verify_dir(data_dir, manifest) for data_dir, manifest in manifests)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
