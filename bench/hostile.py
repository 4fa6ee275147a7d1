"""Hostile input against the tools, each case in a fresh process (issue #39).

    python bench/hostile.py [--only SUBSTRING] [--timeout S] [--write]

A larger corpus than the tests' (`tests/test_hostile.py` and the tests it names): broken and
hostile bundles (`bcc info` and `bcc classify` on each), awkward and broken images, ROOTs that
are no folder, report targets that cannot be written where asked, and review workbooks that lead
out of the data folder, do not end or inflate without bound (`bcc-train import-reviews`).  Each
case runs in a sandbox of its own (HOME, the per-user data folder and TMPDIR inside it) and is
judged:

  clean         the expected outcome: a refusal in one `error:` line with its exit code, or a
                run whose report gives every good image a label and every bad one an error row
  traceback     a Python traceback anywhere in the output
  hang          still running after --timeout seconds
  silent wrong  exit 0 where the input must be refused, or a report row with a label but no
                finite confidence, or a bad image labelled
  writes outside  a file created in the sandbox outside the folders the command was given

The totals go to stdout (and with --write to bench/RESULTS.md).  Target: every case clean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from common import REPO, cpu_name, publish

sys.path.insert(0, str(REPO / "tests"))

from bundles import make_bundle, set_field
from conftest import ALL4, CLASSES, LABELS
from corpus import build_corpus

KINDS = ("clean", "traceback", "hang", "silent wrong", "writes outside")


@dataclass
class Case:
    name: str
    argv: list[str]
    refuse: bool
    """True: the input must be refused (exit 1 or 2, one `error:` line); False: a run that answers."""
    allowed: list[Path] = field(default_factory=list)
    """Where the command may write, besides the sandbox's home and temp folders."""
    codes: tuple[int, ...] = (1, 2)
    check: Callable[[], str | None] | None = None
    """For a run that answers: what is wrong with its output, or None."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="Run only the cases whose name holds this.")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--write", action="store_true", help="Add the totals to bench/RESULTS.md.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bcc-hostile-") as tmp:
        work = Path(tmp)
        cases = [c for c in build_cases(work) if args.only in c.name]
        started = time.monotonic()
        outcomes: Counter[str] = Counter()
        not_clean = []
        for case in cases:
            kind, detail = run_case(case, work, args.timeout)
            outcomes[kind] += 1
            print(f"{kind:>14}  {case.name}" + (f"  ({detail})" if detail else ""), flush=True)
            if kind != "clean":
                not_clean.append(f"- {kind}: {case.name} ({detail})")
        seconds = time.monotonic() - started
    lines = [f"### Hostile input (`bench/hostile.py`), {date.today():%Y-%m-%d}, {cpu_name()}", "",
             f"{len(cases)} cases in {seconds:.0f} s: " + ", ".join(f"{outcomes[k]} {k}" for k in KINDS) + ".",
             *([""] + not_clean if not_clean else [])]
    publish("\n".join(lines), args.write, "## Hostile input")
    sys.exit(0 if outcomes["clean"] == len(cases) else 1)


def run_case(case: Case, work: Path, timeout: float) -> tuple[str, str]:
    sandbox = work / "sandbox" / case.name
    for sub in ("home", "data", "tmp"):
        (sandbox / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(sandbox / "home"), "XDG_DATA_HOME": str(sandbox / "data"),
           "TMPDIR": str(sandbox / "tmp"), "COLUMNS": "200"}
    before = _files(work)
    try:
        proc = subprocess.run([sys.executable, *case.argv], capture_output=True, text=True, errors="replace",
                              timeout=timeout, env=env, cwd=sandbox / "home", stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "hang", f"over {timeout:g} s"
    output = proc.stdout + proc.stderr
    allowed = [sandbox, *case.allowed]
    outside = sorted(p for p in _files(work) - before if not any(p.is_relative_to(a) for a in allowed))
    if "Traceback (most recent call last)" in output:
        return "traceback", output.strip().splitlines()[-1][:160]
    if outside:
        return "writes outside", str(outside[0])
    if case.refuse:
        if proc.returncode == 0:
            return "silent wrong", "exit 0"
        said = [ln for ln in output.splitlines() if ln.startswith("error:")]
        if proc.returncode not in case.codes or len(said) != 1:
            return "silent wrong", f"exit {proc.returncode}, {len(said)} error lines: {output.strip()[-160:]}"
        return "clean", ""
    if proc.returncode not in case.codes:
        return "silent wrong", f"exit {proc.returncode}: {output.strip()[-160:]}"
    problem = case.check() if case.check else None
    return ("silent wrong", problem) if problem else ("clean", "")


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if not p.is_dir()}


# ---------------------------------------------------------------------------------------------
# The corpus

def build_cases(work: Path) -> list[Case]:
    jpgs = sorted(ALL4.glob("*/*.jpg"))[::9]
    lab = work / "lab"
    for i, p in enumerate(jpgs[:6]):
        (lab / f"slide-{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, lab / f"slide-{i % 2}" / p.name)
    good = make_bundle(work / "bundles" / "good", hidden=[32], review_threshold=0.6)
    reports = work / "reports"
    reports.mkdir()
    return [*bundle_cases(work, good, lab, reports), *image_cases(work, good, jpgs, reports),
            *root_cases(work, good, reports), *report_cases(work, good, lab), *workbook_cases(work, good, lab)]


def _classify(root: Path, bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "bcc_desk", "classify", str(root), "-m", str(bundle), "-o", str(out), "--allow-unvalidated", *extra]


def _edited(good: Path, dest: Path, change: Callable[[dict], object]) -> Path:
    shutil.copytree(good, dest)
    meta = json.loads((dest / "bundle.json").read_text())
    change(meta)
    (dest / "bundle.json").write_text(json.dumps(meta))
    return dest


BUNDLE_JSON_EDITS: list[tuple[str, str, object]] = [
    ("std-zero", "input.std", [0, 0, 0]), ("std-negative", "input.std", [-1, 1, 1]),
    ("mean-two", "input.mean", [0.5, 0.5]), ("mean-text", "input.mean", "grey"),
    ("temperature-tiny", "temperature", 1e-308), ("temperature-inf", "temperature", math.inf),
    ("temperature-nan", "temperature", math.nan), ("temperature-text", "temperature", "hot"),
    ("size-huge", "input.size", 100000), ("size-negative", "input.size", -5), ("size-float", "input.size", 64.5),
    ("hidden-huge", "head.hidden", [10**12]), ("hidden-number", "head.hidden", 5),
    ("hidden-deep", "head.hidden", [64] * 50), ("crop-tiny", "input.crop_pct", 1e-300),
    ("threshold-text", "review_threshold", "abc"), ("threshold-nan", "review_threshold", math.nan),
    ("threshold-big", "review_threshold", 7), ("classes-three", "classes", CLASSES[:3]),
    ("classes-many", "classes", [f"c{i}" for i in range(5000)]), ("classes-not-list", "classes", "Benign"),
    ("arch-unknown", "arch", "resnet9000"), ("arch-import", "arch", "__import__('os').system('id')"),
    ("channels-unknown", "input.channels", "xray"),
]


def bundle_cases(work: Path, good: Path, lab: Path, reports: Path) -> list[Case]:
    root = work / "bundles"
    broken: list[tuple[str, Path]] = []
    for name, path, value in BUNDLE_JSON_EDITS:
        broken.append((name, _edited(good, root / name, set_field(path, value))))

    for name, text in (("json-200000-deep", "[" * 200_000 + "]" * 200_000), ("json-empty", ""),
                       ("json-not-json", "{'arch': convnext"), ("json-list", "[1, 2]")):
        shutil.copytree(good, root / name)
        (root / name / "bundle.json").write_text(text)
        broken.append((name, root / name))
    huge = shutil.copytree(good, root / "json-huge")
    with open(huge / "bundle.json", "a") as fh:
        fh.write(" " * (20 << 20))
    broken.append(("json-huge", huge))
    fifo = shutil.copytree(good, root / "json-fifo")
    (fifo / "bundle.json").unlink()
    os.mkfifo(fifo / "bundle.json")
    broken.append(("json-fifo", fifo))
    for name, damage in (("weights-missing", lambda p: p.unlink()),
                         ("weights-truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
                         ("weights-garbage", lambda p: p.write_bytes(os.urandom(4096))),
                         ("weights-pickle", lambda p: p.write_bytes(b"\x80\x04\x95" + os.urandom(64)))):
        b = shutil.copytree(good, root / name)
        damage(b / "model.safetensors")
        broken.append((name, b))
    broken.append(("weights-nan", _nan_weights(good, root / "weights-nan")))
    cases = []
    for name, bundle in broken:
        cases.append(Case(f"bundle {name}: info", ["-m", "bcc_desk", "info", str(bundle)], refuse=True))
        out = reports / f"{name}.xlsx"
        cases.append(Case(f"bundle {name}: classify", _classify(lab, bundle, out), refuse=True, allowed=[reports]))
    return cases


def _nan_weights(good: Path, dest: Path) -> Path:
    """NaN in the head, the sha256 in bundle.json updated to match (a careful forger)."""
    from safetensors.torch import load_file, save_file

    from bcc_desk.files import file_sha256

    shutil.copytree(good, dest)
    weights = load_file(str(dest / "model.safetensors"))
    name = next(k for k in weights if k.startswith("head") and k.endswith("weight"))
    weights[name] = weights[name] * float("nan")
    save_file(weights, str(dest / "model.safetensors"))
    return _edited_in_place(dest, set_field("weights_sha256", file_sha256(dest / "model.safetensors")))


def _edited_in_place(folder: Path, change: Callable[[dict], object]) -> Path:
    meta = json.loads((folder / "bundle.json").read_text())
    change(meta)
    (folder / "bundle.json").write_text(json.dumps(meta))
    return folder


def image_cases(work: Path, good: Path, jpgs: list[Path], reports: Path) -> list[Case]:
    root = work / "images"
    expected = build_corpus(root, jpgs)
    os.mkfifo(root / "bad" / "camera-pipe.jpg")
    (root / "bad" / "folder.jpg").mkdir()
    os.symlink("loop-b.jpg", root / "bad" / "loop-a.jpg")
    os.symlink("loop-a.jpg", root / "bad" / "loop-b.jpg")
    shutil.copy(jpgs[0], root / "slide-A" / os.fsdecode(b"field-\xff\xfe.jpg"))
    (root / "slide-A" / "<script>alert(1)<script>.jpg").write_bytes(jpgs[1].read_bytes())
    out = reports / "images.xlsx"
    bad = {"bad/camera-pipe.jpg", "bad/loop-a.jpg", "bad/loop-b.jpg",
           *(name for name, error in expected.items() if error is not None)}

    def check() -> str | None:
        import openpyxl

        ws = openpyxl.load_workbook(out, read_only=True)["Images"]
        rows = list(ws.iter_rows(values_only=True))
        header, body = list(rows[0]), rows[1:]
        col = {name: header.index(name) for name in ("file", "label", "confidence", "needs_review", "error")}
        files = {r[col["file"]]: r for r in body}
        for name, row in files.items():
            labelled, confidence = row[col["label"]] is not None, row[col["confidence"]]
            if labelled and (not isinstance(confidence, (int, float)) or not math.isfinite(confidence)):
                return f"{name}: a label without a confidence"
            if not labelled and (row[col["error"]] is None or row[col["needs_review"]] not in (True, "yes", 1)):
                return f"{name}: no label and not an error flagged for review"
            if name in bad and labelled:
                return f"{name}: a bad image labelled"
        missing = {n for n in expected if n not in files and n != "slide-B/vanish.jpg"}
        return f"missing rows: {sorted(missing)[:3]}" if missing else None

    return [Case("images: every awkward and broken file a folder holds", _classify(root, good, out), refuse=False,
                 allowed=[reports], codes=(0,), check=check)]


def root_cases(work: Path, good: Path, reports: Path) -> list[Case]:
    odd = work / "roots"
    odd.mkdir()
    os.mkfifo(odd / "pipe")
    (odd / "notes.txt").write_text("not an image")
    (odd / "empty").mkdir()
    (odd / "only-bad" / "s").mkdir(parents=True)
    (odd / "only-bad" / "s" / "a.jpg").write_bytes(b"")
    cases = []
    for name, root in (("a pipe", odd / "pipe"), ("/dev/null", Path("/dev/null")), ("a text file", odd / "notes.txt"),
                       ("missing", odd / "nowhere"), ("an empty folder", odd / "empty")):
        cases.append(Case(f"root {name}", _classify(root, good, reports / "root.xlsx"), refuse=True, allowed=[reports]))
    cases.append(Case("root of unreadable images only", _classify(odd / "only-bad", good, reports / "bad.xlsx"),
                      refuse=True, allowed=[reports], codes=(1,)))
    cases.append(Case("watch root a pipe", ["-m", "bcc_desk", "watch", str(odd / "pipe"), "-m", str(good)], refuse=True))
    return cases


def report_cases(work: Path, good: Path, lab: Path) -> list[Case]:
    target = work / "targets"
    target.mkdir()
    (target / "~$locked.xlsx").write_bytes(b"owner")
    (target / "locked.xlsx").write_bytes(b"last week's")
    (target / "a-folder.xlsx").mkdir()

    def beside(stem: str) -> Callable[[], str | None]:
        def check() -> str | None:  # exit 3: the report whole beside the target, the target as it was
            if not list(target.glob(f"{stem} (*).xlsx")):
                return f"no report beside {stem}.xlsx"
            if (target / "locked.xlsx").read_bytes() != b"last week's":
                return "the locked target was overwritten"
            return None
        return check

    return [
        Case("report folder missing", _classify(lab, good, target / "nowhere" / "r.xlsx"), refuse=True),
        Case("report named .txt", _classify(lab, good, target / "r.txt"), refuse=True),
        Case("report target open in Excel", _classify(lab, good, target / "locked.xlsx"), refuse=False, codes=(3,),
             allowed=[target], check=beside("locked")),
        Case("report target a folder", _classify(lab, good, target / "a-folder.xlsx"), refuse=False, codes=(3,),
             allowed=[target], check=beside("a-folder")),
    ]


def workbook_cases(work: Path, good: Path, lab: Path) -> list[Case]:
    import openpyxl

    books = work / "workbooks"
    books.mkdir()
    base = books / "review.xlsx"
    subprocess.run([sys.executable, *_classify(lab, good, base)], check=True, capture_output=True)
    cases = []
    for name, escape in (("class ../../outside", "../../outside"), ("class absolute", str(work / "absolute")),
                         ("class with a slash", "a/b")):
        book = books / f"{name.replace('/', '_').replace(' ', '-')}.xlsx"
        wb = openpyxl.load_workbook(base)
        row = next(r for r in wb["Run"].iter_rows(min_row=2) if r[0].value == "classes")
        row[1].value = "; ".join([escape, *LABELS[1:]])
        ws = wb["Images"]  # a reviewer's column typed into the report, as the README allows
        ws.cell(row=1, column=ws.max_column + 1, value="reviewer label")
        ws.cell(row=2, column=ws.max_column, value=escape)
        wb.save(book)
        data = books / f"data-{len(cases)}"
        cases.append(Case(f"workbook {name}", ["-m", "trainer", "import-reviews", str(book), "--into", str(data)],
                          refuse=True, allowed=[data]))
    os.mkfifo(books / "pipe.xlsx")
    with zipfile.ZipFile(books / "bomb.xlsx", "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as fh:
            chunk = b"\0" * (1 << 20)
            for _ in range(1024):  # 1 GB inflated, about 1 MB on disk
                fh.write(chunk)
    with open(books / "huge.xlsx", "wb") as fh:
        fh.truncate(300 << 20)  # sparse: 300 MB that take no disk
    (books / "text.xlsx").write_text("id,label\n1,Benign\n")
    for name in ("pipe", "bomb", "huge", "text"):
        data = books / f"data-{name}"
        cases.append(Case(f"workbook {name}", ["-m", "trainer", "import-reviews", str(books / f"{name}.xlsx"),
                                               "--into", str(data)], refuse=True, allowed=[data]))
    return cases


if __name__ == "__main__":
    main()
