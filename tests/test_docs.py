"""The docs are tested: their Python examples run, and every config key they name exists.

``test_python_blocks_run`` executes every ```python block of README.md, train/README.md and
docs/*.md, one test per file, on a phantom bank. What a block may assume:

* the current directory is a fresh folder of its own (one per doc file) holding
  ``bank/``, a bank of phantom scans with labels, label names and proposals, whose
  scans are ``ct-0001``, ``ct-0002``, ``ct-0003`` (CT, dataset ``phantom``) and
  ``mr-0001`` (MR, dataset ``phantom-mr``); and ``ref.nii.gz``, ``ref_seg.nii.gz``
  (a CT phantom and its label map) and ``new_scans/`` (two more CT phantoms as NIfTI),
  for the segmentation examples;
* the blocks of one file run in order in one namespace, as cells of a notebook: a
  block may use what an earlier block of the same file defined, nothing else is
  predefined;
* no GPU, no network, no real scans; matplotlib draws off-screen.

A block that cannot run under these terms (it needs a GPU, an S3 bucket, real data, a
Prefect server or a cluster) carries ``# doctest: skip (why)`` on a line of its own, and
the reason is required. Training in a block keeps to a step or two (``train.max_steps``):
every block of every doc takes about 50 s of CPU in all.

``test_config_keys_exist`` finds every training config key the docs name (``data.k``,
``train.max_steps``, ``loss.tversky_weight``, ``max_steps=N`` overrides ...) and resolves
it the way ``train/run.py`` resolves an override (``run_config.apply_overrides``), and
every ``PrepareConfig.x`` / ``ProposalConfig.x`` (and the keys of a deployment's
``"config": {...}``, a ``PrepareConfig``) against the fields their ``from_dict`` accepts.
``test_cli_doc_covers_every_command`` holds docs/cli.md to ``maskbank --help``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import traceback
from pathlib import Path

import pytest

from maskbank.train.pretext import PRETEXTS

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "train" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"^\s*#\s*doctest:\s*skip\b(.*)$", re.M)
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) for each ```python block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _skip_reason(code: str) -> str | None:
    """The reason beside ``# doctest: skip``, or None for a block that runs."""
    match = SKIP.search(code)
    return None if match is None else match.group(1).strip(" -:()")


def _runnable(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, code in python_blocks(path) if _skip_reason(code) is None]


WITH_BLOCKS = [p for p in DOCS if _runnable(p)]


# ----------------------------------------------------------------------------- workspace
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The folder every doc file's blocks start from (copied per file): see the docstring."""
    from maskbank.bank import Bank
    from maskbank.flows.demo_bank import add_phantom_scan
    from maskbank.pipeline.phantom import make_phantom

    root = tmp_path_factory.mktemp("docs")
    bank = Bank.create(root / "bank")
    shape = (48, 48, 40)
    for i in range(3):
        add_phantom_scan(bank, f"ct-{i + 1:04d}", "ct", shape, seed=i, dataset="phantom")
    add_phantom_scan(bank, "mr-0001", "mr", shape, seed=3, dataset="phantom-mr")
    ref_image, ref_seg = make_phantom("ct", shape=shape, spacing=(1.5,) * 3, seed=7).save_nifti(
        root, "ref"
    )
    ref_seg.rename(root / "ref_seg.nii.gz")
    for seed in (8, 9):
        image, label = make_phantom("ct", shape=shape, spacing=(1.5,) * 3, seed=seed).save_nifti(
            root / "new_scans", f"scan-{seed}"
        )
        label.unlink()
    return root


@pytest.mark.parametrize("doc", WITH_BLOCKS, ids=_rel)
def test_python_blocks_run(doc: Path, workspace: Path, tmp_path, monkeypatch) -> None:
    here = tmp_path / "docs"
    shutil.copytree(workspace, here)
    monkeypatch.chdir(here)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__doc_example__"}
    # Blocks may extend a registry (docs/architecture.md adds a pretext): undone after the
    # file, so that the tests that run later in this process see the library's own entries.
    saved = dict(PRETEXTS)
    try:
        for line, code in _runnable(doc):
            try:
                # Padded so that a traceback names the doc's own line numbers.
                exec(compile("\n" * (line - 1) + code, _rel(doc), "exec"), namespace)
            except Exception:
                pytest.fail(
                    f"the ```python block at {_rel(doc)}:{line} failed:\n{traceback.format_exc()}",
                    pytrace=False,
                )
    finally:
        PRETEXTS.clear()
        PRETEXTS.update(saved)


def test_skipped_blocks_say_why() -> None:
    for doc in DOCS:
        for line, code in python_blocks(doc):
            reason = _skip_reason(code)
            assert reason is None or len(reason) >= 8, (
                f"{_rel(doc)}:{line}: '# doctest: skip' needs its reason beside it"
            )


# ----------------------------------------------------------------------------- config keys
SECTIONS = ("data", "model", "augment", "reconstruction", "loss", "optim", "train")
# A dotted key of a training config section; not a call, a module path or a file name.
DOTTED = re.compile(
    r"(?<![\w./-])((?:" + "|".join(SECTIONS) + r")(?:\.[a-z_][a-z0-9_]*)+)(?![\w(/-])"
)
FILE_SUFFIXES = {"json", "jsonl", "yaml", "yml", "py", "pt", "pth", "md", "csv", "txt", "png"}
# KEY=VALUE overrides on a command line of train/run.py or `maskbank pretrain`.
OVERRIDE = re.compile(r"(?<=\s)([a-z_][a-z0-9_.]*)=(?!=)")
PREPARE_JSON = re.compile(r'"config"\s*:\s*\{([^{}]*)\}')  # a prepare flow's parameters
DATACLASS_FIELD = re.compile(r"\b(PrepareConfig|ProposalConfig)\.([a-z_][a-z0-9_]*)\b")


def _is_module(dotted: str) -> bool:
    """``train.run``, ``train.evaluation.checkpoint``: a module or package of ours."""
    parts = dotted.split(".")
    for i in range(2, len(parts) + 1):
        base = REPO.joinpath(*parts[:i])
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
            return True
    return False


def doc_config_keys() -> list[tuple[str, int, str]]:
    """(doc, line, key) for every training config key the docs name."""
    found = []
    for doc in DOCS:
        for n, text in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for m in DOTTED.finditer(text):
                if not _is_module(m.group(1)) and m.group(1).rsplit(".")[-1] not in FILE_SUFFIXES:
                    found.append((_rel(doc), n, m.group(1)))
            if "train/run.py" in text or "maskbank pretrain" in text:
                for m in OVERRIDE.finditer(text):
                    found.append((_rel(doc), n, m.group(1)))
    return found


def test_config_keys_exist() -> None:
    from maskbank.pipeline.config import PrepareConfig
    from maskbank.pipeline.proposals.engine import ProposalConfig
    from maskbank.train.run_config import TrainConfig, UnknownKeyError, apply_overrides

    keys = doc_config_keys()
    assert {"data.k", "max_steps"} <= {k for _, _, k in keys}  # the search
    defaults, bad = TrainConfig().to_dict(), []
    for doc, line, key in keys:
        try:
            apply_overrides(defaults, [f"{key}=0"])
        except UnknownKeyError as exc:
            bad.append(f"{doc}:{line}: {exc}")
    fields = {
        name: {f.name for f in dataclasses.fields(cls)}
        for name, cls in (("PrepareConfig", PrepareConfig), ("ProposalConfig", ProposalConfig))
    }
    for doc in DOCS:
        for n, text in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            named = [(m.group(1), m.group(2)) for m in DATACLASS_FIELD.finditer(text)]
            for m in PREPARE_JSON.finditer(text):
                named += [("PrepareConfig", k) for k in re.findall(r'"(\w+)"\s*:', m.group(1))]
            for cls, key in named:
                if key not in fields[cls]:
                    bad.append(f"{_rel(doc)}:{n}: {cls} has no field {key!r}")
    assert not bad, "config keys the docs name but the code lacks:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- the CLI
def test_cli_doc_covers_every_command() -> None:
    """docs/cli.md has a section with a copyable example for every `maskbank` command."""
    from maskbank.flows.cli import build_parser

    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## `maskbank ([a-z-]+)`\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    for command in _subparsers(build_parser()):
        assert command in sections, f"docs/cli.md has no section '## `maskbank {command}`'"
        assert f"\nmaskbank {command} " in sections[command], (
            f"docs/cli.md, `maskbank {command}`: no example command line"
        )


def _subparsers(parser):
    import argparse

    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _command_lines(doc: Path) -> list[tuple[int, str]]:
    """(line, text) of each `maskbank ...` (or `train/run.py ...`) command in a doc's code:
    fenced lines (with their continuation lines joined) and `backticked` commands in prose."""
    found, fenced, pending = [], False, ""
    for n, text in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if text.startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if fenced:
            text = pending + text.split(" #")[0]
            if text.rstrip().endswith("\\"):
                pending = text.rstrip()[:-1] + " "
                continue
            pending = ""
            for part in re.split(r"&&|;|\|", text):
                if re.match(r"\s*(?:\$ )?maskbank ", part):
                    found.append((n, part.strip().removeprefix("$ ")))
                elif "train/run.py" in part:
                    found.append((n, "train/run.py " + part.split("train/run.py", 1)[1]))
        else:
            found += [(n, m) for m in re.findall(r"`(maskbank [^`]*)`", text)]
    return found


def test_doc_command_lines_exist() -> None:
    """Every `maskbank` (and `train/run.py`) command line in the docs names a real command
    and real options."""
    from maskbank.flows.cli import build_parser
    from maskbank.train.run import parse_args

    commands = _subparsers(build_parser())
    evaluations = _subparsers(commands["evaluate"])
    bad, seen = [], 0
    for doc in DOCS:
        for n, line in _command_lines(doc):
            words = line.split()
            if words[0] == "train/run.py":
                try:
                    parse_args(words[1:])
                except SystemExit:
                    bad.append(f"{_rel(doc)}:{n}: train/run.py refuses {' '.join(words[1:])}")
                continue
            name = words[1] if len(words) > 1 else ""
            parser = commands.get(name)
            if parser is None:
                if re.fullmatch(r"[a-z][a-z-]*", name):
                    bad.append(f"{_rel(doc)}:{n}: no command 'maskbank {name}'")
                continue
            if name == "evaluate" and len(words) > 2 and not words[2].startswith("-"):
                kinds = re.split(r"\\?\|", words[2])  # incontext|finetune: each must exist
                bad += [
                    f"{_rel(doc)}:{n}: no evaluation 'maskbank evaluate {kind}'"
                    for kind in kinds
                    if kind not in evaluations
                ]
                parser = evaluations.get(kinds[0])
                if parser is None:
                    continue
            options = {o for a in parser._actions for o in a.option_strings}
            for word in words[2:]:
                option = word.split("=")[0].strip("`[]()|,.")
                if option.startswith("--") and option not in options:
                    bad.append(f"{_rel(doc)}:{n}: 'maskbank {name}' has no option {option}")
            seen += 1
    assert seen > 30, seen  # the search finds the docs' command lines
    assert not bad, "command lines in the docs that maskbank refuses:\n" + "\n".join(bad)
