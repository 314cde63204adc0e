"""cli.py: the command line generated from a settings dataclass, the run folders, and the progress lines."""
import io
import sys
from dataclasses import dataclass

import pytest

import cli
import train_images


@dataclass
class Settings:
    steps: int = 10               # training steps
    lr: float = 0.1               # learning rate, which a
                                  # second comment line continues
    # Runtime
    flag: bool = False            # a switch
    sizes: tuple = (1, 2)         # resolutions
    name: str = "x"               # a name, 100% free text
    preset: str = "small"         # small | big
    quick: bool = False           # tiny settings


PRESETS = {"small": {}, "big": {"steps": 500, "sizes": (4,)}}
QUICK = {"steps": 2}


def parse(*argv):
    return cli.parse(Settings, argv, PRESETS, "small", QUICK)


def test_values_are_typed_and_resolved_in_order():
    assert parse() == Settings()
    assert parse("--preset=big") == Settings(steps=500, sizes=(4,), preset="big")
    assert parse("--preset=big", "--quick", "--lr=1e-3", "--flag", "--sizes=8,16") == \
        Settings(steps=2, lr=1e-3, flag=True, sizes=(8, 16), preset="big", quick=True)
    assert parse("--flag=false").flag is False and parse("--flag=true").flag is True


@pytest.mark.parametrize("argv, message", [
    (["--stpes=3"], "unknown argument '--stpes=3' (expected --key=value); did you mean --steps? valid keys: --help"),
    (["--iters=3"], "unknown argument '--iters=3' (expected --key=value); did you mean --steps?"),  # older spelling
    (["--pc_steps=3"], "unknown argument '--pc_steps=3' (expected --key=value); it is now spelled --sample_steps, "
                       "which this script does not have; valid keys"),  # no guess at a look-alike (--steps)
    (["--zzz=3"], "unknown argument '--zzz=3' (expected --key=value); valid keys: --help, --steps, --lr"),
    (["steps=3"], "unknown argument 'steps=3'"),
    (["--steps=3.5"], "--steps takes an integer, got '3.5'"),
    (["--flag=maybe"], "--flag takes true or false, got 'maybe'"),
    (["--sizes=a,b"], "--sizes takes comma-separated integers, got 'a,b'"),
    (["--preset=huge"], "unknown preset 'huge'; valid choices: small, big"),
])
def test_bad_input_is_one_plain_sentence(argv, message):
    with pytest.raises(ValueError) as e:
        parse(*argv)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("name", ["out_dir", "batch_size", "steps", "sample_steps"])
def test_one_spelling_per_setting_across_the_scripts(name):
    """Every script that has the setting spells it the same way; no script keeps an older spelling."""
    import autoencoder, bench, dlsm, ebflow, evaluate, toy
    fields = {m.__name__: {f for f in m.Config.__dataclass_fields__} for m in (toy, autoencoder, ebflow, dlsm, bench)}
    fields |= {"evaluate": set(evaluate.EvalConfig.__dataclass_fields__),
               "train_images": set(train_images.Config.__dataclass_fields__)}
    old = [k for k, v in cli.RENAMED.items() if v == name]
    assert old and all(not (fields[m] & set(old)) for m in fields), fields
    assert sum(name in f for f in fields.values()) >= 2


def test_help_shows_each_option_its_type_the_preset_default_and_the_presets(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--preset=big", "--help")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())                     # argparse wraps lines
    assert "--steps INT training steps [an integer; default 500]" in out     # the preset's value
    assert "--lr FLOAT learning rate, which a second comment line continues [a number; default 0.1]" in out
    assert "Runtime: --flag [BOOL] a switch [true or false; default false]" in out   # the section comment
    assert "--sizes INTS resolutions [comma-separated integers; default 4]" in out
    assert "100% free text" in out
    assert "big --steps=500 --sizes=4" in out and "--quick sets: --steps=2" in out
    assert "__post_init__" not in out and "@dataclass" not in out


def test_train_images_help_shows_the_preset_values(capsys):
    with pytest.raises(SystemExit):
        train_images.parse_config(["--preset=digits", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--nf INT base width (paper: 128) [an integer; default 32]" in out
    assert "--dtype TEXT float32 | bf16" in out and "cifar10_qc_finetune" in out
    assert "def __post_init__" not in out


def test_run_folder_names_say_what_differs():
    name = lambda *a: cli.run_dir("runs/x", parse(*a), PRESETS, "small", QUICK)
    assert name() == "runs/x"
    assert name("--quick") == "runs/x_quick"                         # quick's own settings are not listed
    assert name("--preset=big", "--lr=0.5", "--name=a/b") == "runs/x_big_lr-0.5_name-a-b"
    assert cli.command("x.py", parse("--preset=big", "--quick", "--flag"), PRESETS, "small", QUICK) == \
        "python x.py --preset=big --quick --flag=true"


def test_run_prints_one_line_instead_of_a_traceback(monkeypatch, capsys):
    def main(argv):
        raise ValueError("--steps must be positive")
    monkeypatch.setattr(sys, "argv", ["x.py", "--steps=-1"])
    monkeypatch.delenv("QCSBM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == "error: --steps must be positive (python x.py --help lists every option)"


def test_progress_prints_plain_lines_when_not_a_terminal():
    log = io.StringIO()                                              # not a TTY
    for _ in cli.progress(range(100_000), desc="work", file=log, interval=3600):
        pass
    lines = log.getvalue().splitlines()
    assert 1 <= len(lines) <= 3 and "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[-1].startswith("work: 100%") and "100000/100000" in lines[-1]
    transient = io.StringIO()                                        # leave=False: nothing stuck at 0% in a log
    for _ in cli.progress(range(10), desc="inner", file=transient, leave=False):
        pass
    assert transient.getvalue() == ""
