"""The README's notebook example runs offline as written, and its commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_notebook_example_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## In a notebook\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    log = namespace["trainer"].state.log_history
    assert namespace["trainer"].state.global_step == 5
    assert log[0]["off_policy/reward_mean"] == 1.0  # the teacher trace is correct and scored as such
    assert log[0]["off_policy/fraction_of_rows"] == 0.25


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().replace("pip install -q ", "pip install ")
