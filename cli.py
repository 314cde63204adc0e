"""The scripts' command lines, generated from each script's settings dataclass with argparse.

Every script opens with a `@dataclass` of its settings, one commented field per setting. `parse` turns
it into a command line: `--key=value` for every field (`--flag` alone for a bool), the field's comment
as its one-line help, `--preset=NAME` for a small dict of overrides, `--quick` for the tiny settings the
tests use. Values are resolved in the order: field default < preset < quick < the command line, and
`--help` shows the defaults of the chosen preset. Bad input raises ValueError with a one-line message;
`run(main)` prints it as `error: ...` instead of a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import io
import os
import re
import sys
import tokenize
from typing import Callable, Sequence

from tqdm import tqdm

# How each setting's type reads in --help and in error messages.
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text",
              tuple: "comma-separated integers"}
# One spelling per setting across the scripts; these older spellings get a pointer to the new one.
RENAMED = {"out": "out_dir", "batch": "batch_size", "iters": "steps", "pc_steps": "sample_steps"}
METAVARS = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT", tuple: "INTS"}


def to_bool(s: str) -> bool:
    if s.lower() in ("", "true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise ValueError


def converter(kind: type, key: str) -> Callable[[str], object]:
    """str -> value of `kind`; a bad value is an error in plain words naming the option."""
    parse = {bool: to_bool, tuple: lambda s: tuple(int(v) for v in s.split(",") if v)}.get(kind, kind)

    def convert(s: str):
        try:
            return parse(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{key} takes {TYPE_WORDS[kind]}, got {s!r}") from None
    return convert


def field_comments(cls) -> tuple[dict, dict]:
    """({field: its trailing comment}, {field: the section comment above it}) from the dataclass source.
    A comment line indented deeper than the fields continues the previous field's comment."""
    src = inspect.getsource(cls)
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("# ").rstrip())
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    helps, sections, last, section = {}, {}, None, ""
    names = {f.name for f in dataclasses.fields(cls)}
    for no, line in enumerate(src.splitlines(), 1):
        if re.match(r"\s+(def |@)", line):                  # methods (__post_init__) end the fields
            break
        m = re.match(r"(\s*)(\w+)\s*:", line)
        if m and m.group(2) in names:
            last, indent = m.group(2), len(m.group(1))
            helps[last], sections[last] = comments.get(no, (0, ""))[1], section
        elif no in comments and not line[:comments[no][0]].strip() and last:
            col, text = comments[no]
            if col > indent:
                helps[last] = f"{helps[last]} {text}".strip()
            else:
                section = text
    return helps, sections


def show(value) -> str:
    """A setting as it is typed on the command line: true, 1,2,2, 0.0001."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a ValueError the caller can catch (and run() prints), not exit(2)
        raise ValueError(re.sub(r"^argument --\w+: (?=--)", "", message))


def build_parser(cls, defaults: dict, presets: dict | None, chosen: str, quick: dict | None,
                 note: str = "") -> Parser:
    """An argparse parser with one --key option per field of `cls`; its help shows `defaults`."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    prog = os.path.basename(sys.modules[cls.__module__].__file__ or cls.__module__)
    epilog = []
    if presets:
        epilog.append(f"presets (--preset=NAME; defaults above are --preset={chosen}'s):")
        epilog += [f"  {name:22s} " + (" ".join(f"--{k}={show(v)}" for k, v in over.items()) or "(field defaults)")
                   for name, over in presets.items()]
    if quick:
        epilog.append("--quick sets: " + " ".join(f"--{k}={show(v)}" for k, v in quick.items()))
    p = Parser(prog=prog, description=doc, epilog="\n".join(epilog + [note] * bool(note)), allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    helps, sections = field_comments(cls)
    groups = {}
    if presets and "preset" not in defaults:
        p.add_argument("--preset", metavar="NAME", help=f"one of: {', '.join(presets)} (default {chosen})")
    for f in dataclasses.fields(cls):
        kind, value = type(f.default), defaults[f.name]
        title = sections.get(f.name) or "settings"
        group = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        shown = show(value) or "''"
        text = f"{helps.get(f.name, '')} [{TYPE_WORDS.get(kind, kind.__name__)}; default {shown}]"
        extra = dict(nargs="?", const=True) if kind is bool else {}
        group.add_argument(f"--{f.name}", type=converter(kind, f.name), metavar=METAVARS.get(kind, "VALUE"),
                           help=text.replace("%", "%%"), **extra)
    return p


def parse_overrides(cls, argv: Sequence[str], defaults: dict | None = None, presets: dict | None = None,
                    chosen: str = "", quick: dict | None = None, note: str = "") -> dict:
    """The settings given on the command line, typed: {field: value} (and 'preset' if given).
    Unknown keys and bad values raise ValueError naming the valid ones; --help prints and exits."""
    defaults = defaults or {f.name: f.default for f in dataclasses.fields(cls)}
    p = build_parser(cls, defaults, presets, chosen, quick, note)
    given, rest = p.parse_known_args(list(argv))
    if rest:
        valid = ["--help", *(["--preset"] if presets and "preset" not in defaults else []),
                 *(f"--{f.name}" for f in dataclasses.fields(cls))]
        key = rest[0].split("=")[0]
        renamed = RENAMED.get(key.lstrip("-"))
        if renamed:      # an older spelling: name its current one, or say this script has no such setting
            hint = f"; did you mean --{renamed}?" if f"--{renamed}" in valid else \
                f"; it is now spelled --{renamed}, which this script does not have;"
        else:
            guess = next(iter(difflib.get_close_matches(key, valid, 1)), "")
            hint = f"; did you mean {guess}?" if guess else ";"
        raise ValueError(f"unknown argument {rest[0]!r} (expected --key=value){hint} valid keys: {', '.join(valid)}")
    return vars(given)


def field_values(cls, presets: dict | None, preset: str, quick: dict | None, is_quick: bool) -> dict:
    """Field defaults < the preset's overrides < quick's (if is_quick): the settings before the command line."""
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    values |= (presets or {}).get(preset, {}) | (quick or {} if is_quick else {})
    if "preset" in values:
        values["preset"] = preset
    return values


def parse(cls, argv: Sequence[str], presets: dict | None = None, preset: str = "", quick: dict | None = None):
    """Settings dataclass `cls` from `--key=value` arguments: field defaults < `--preset=NAME` (one of
    `presets`, `preset` if not given) < `quick` if `--quick` is given < every other argument."""
    first = Parser(add_help=False, allow_abbrev=False)           # which preset and --quick: they set defaults
    first.add_argument("--preset", default=preset)
    first.add_argument("--quick", nargs="?", const="true", default="false", type=converter(bool, "quick"))
    known, _ = first.parse_known_args(list(argv))
    if presets is not None and known.preset not in presets:
        raise ValueError(f"unknown preset {known.preset!r}; valid choices: {', '.join(presets)}")
    values = field_values(cls, presets, known.preset, quick, known.quick)
    given = parse_overrides(cls, argv, values, presets, known.preset, quick)
    given.pop("preset", None)
    return cls(**(values | given))


def differences(cfg, presets: dict | None = None, default_preset: str = "", quick: dict | None = None,
                skip: Sequence[str] = ()) -> dict:
    """What sets this run apart from the default run: the preset (if not the default), quick (if on), and
    every setting that differs from what those two set; the keys in `skip` are left out."""
    now = dataclasses.asdict(cfg)
    preset = now.get("preset", default_preset)
    ref = field_values(type(cfg), presets, preset, quick, now.get("quick", False))
    out = {"preset": preset} if preset != default_preset else {}
    out |= {"quick": True} if now.get("quick") else {}
    return out | {k: v for k, v in now.items() if k not in ("preset", "quick", *skip) and v != ref[k]}


def run_dir(base: str, cfg, presets: dict | None = None, default_preset: str = "", quick: dict | None = None,
            skip: Sequence[str] = ()) -> str:
    """The output folder of a run given none: `base` for the default run, otherwise `base` followed by
    what differs (see `differences`), e.g. runs/toy_paper, runs/toy_quick, runs/toy_seeds-1. So no run
    replaces the results of a run with other settings."""
    diff = differences(cfg, presets, default_preset, quick, skip)
    parts = [{"preset": show(v), "quick": "quick"}.get(k, f"{k}-{show(v)}") for k, v in diff.items()]
    return "_".join([base, *(p.replace(os.sep, "-") for p in parts)])


def command(script: str, cfg, presets: dict | None = None, default_preset: str = "", quick: dict | None = None,
            skip: Sequence[str] = ()) -> str:
    """The shortest command line that repeats this run: `python toy.py --preset=paper --seeds=1`."""
    diff = differences(cfg, presets, default_preset, quick, skip)
    return " ".join(["python", script, *("--quick" if k == "quick" else f"--{k}={show(v)}"
                                          for k, v in diff.items())])


class RunError(Exception):
    """A fault the user has to act on (a full disk, another run in the same folder): one message, which
    the command line prints without a traceback."""


def run(main: Callable) -> None:
    """Run a script's main(argv) from the command line. Bad input (ValueError, FileNotFoundError), a
    missing optional library (ImportError) or a RunError ends with its one-line message and exit status
    1, not a traceback; QCSBM_TRACEBACK=1 shows it."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, ImportError, RunError) as e:
        if os.environ.get("QCSBM_TRACEBACK"):
            raise
        prog = os.path.basename(sys.argv[0])
        sys.exit(f"error: {e}" + (f" (python {prog} --help lists every option)" if "--" in str(e) else ""))


# ---- Progress ----
# On a terminal, a tqdm bar redraws itself in place. Written to a file or a pipe, every redraw is a new
# line (thousands for one run), so there the bar prints one plain line per `interval` seconds instead.

class _Lines:
    """A file-like object that turns tqdm's in-place redraws into plain lines and drops blank ones."""

    def __init__(self, file):
        self.file = file

    def write(self, s: str):
        s = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", s).replace("\r", "").strip()
        if s:
            self.file.write(s + "\n")

    def flush(self):
        self.file.flush()


def progress(iterable=None, interval: float = 30.0, file=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) on a terminal; elsewhere one line per `interval` seconds, and nothing for a
    transient bar (leave=False): in a log its first line would stay at 0% with nothing after it."""
    file = file or sys.stderr
    if hasattr(file, "isatty") and file.isatty():
        return tqdm(iterable, file=file, **kwargs)
    if kwargs.get("leave") is False:
        kwargs["disable"] = True
    kwargs.pop("position", None)                        # row positions are terminal cursor moves
    kwargs |= dict(mininterval=interval, maxinterval=interval, dynamic_ncols=False, ncols=100)
    return tqdm(iterable, file=_Lines(file), **kwargs)
