"""Every code block in the README runs as written.

Python blocks run in order in one namespace, as a reader pasting them into one session would; the
command-line block runs line by line in a scratch directory holding the ``texts.txt`` it reads. The
set-up blocks (install + explore, install + test) are what CI itself runs, and the explorer is
served by the browser test, so they are only checked to be there.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import interp

README = Path(__file__).resolve().parents[1] / "README.md"
SETUP_MARKERS = ("<!-- explore-command -->", "<!-- test-command -->")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_setup_commands_are_marked_for_ci():
    text = README.read_text()
    for marker in SETUP_MARKERS:
        assert re.search(re.escape(marker) + r"\n```bash\n.+\n```", text), marker


def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 3  # Library, Causal tools, Sparse dictionaries
    monkeypatch.chdir(tmp_path)  # the SAE block writes my_sae/
    namespace: dict = {}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"README python block {index}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            pytest.fail(f"README python block {index} failed: {type(err).__name__}: {err}\n{block}")
    # The causal example's pair is a real induction contrast: clean favours the answer, corrupted not.
    induction = interp.load("zoo:induction-2l")
    metric = namespace["metric"]
    assert float(metric(induction(namespace["clean"]))) > 0 > float(metric(induction(namespace["corrupted"])))
    assert (tmp_path / "my_sae" / "cfg.json").is_file()


def _cli_lines() -> list[str]:
    block = next(b for b in _blocks("bash") if "interp --help" in b)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("line", _cli_lines())
def test_cli_block_line_runs(line, tmp_path):
    (tmp_path / "texts.txt").write_text("The cat sat on the mat.\nA dog ran in the park.\n")
    argv = shlex.split(line)
    assert argv[0] == "interp"
    script = "import sys; from interp.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", script, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{line!r} exited {result.returncode}: {result.stderr[-2000:]}"
