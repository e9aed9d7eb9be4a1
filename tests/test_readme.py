"""The README's callback example runs as written (with fewer epochs) and does what it says."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_callback_example_reaches_the_exact_budget(tmp_path, monkeypatch):
    (block,) = [b for b in _python_blocks() if "class MyClassifier" in b]
    assert "max_epochs=10" in block
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.replace("max_epochs=10", "max_epochs=3"), "README.md", "exec"), scope)
    report = scope["budget"].report
    assert report.kept == round(0.1 * report.total)
    assert set(report.val_before_cut) == set(report.val_after_cut) == {"val_acc"}  # the module's own metric
    assert os.path.exists(tmp_path / "my_pruned_net.pt")
    weights = [m.weight for m in scope["plain"].modules() if hasattr(m, "weight") and m.weight.dim() > 1]
    assert sum(int((w != 0).sum()) for w in weights) == report.kept


def test_ci_runs_the_readmes_two_set_up_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        (setup,) = re.findall(r"## Set up\n\n```bash\n(.*?)```", f.read(), flags=re.S)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line for line in f.read().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert setup.strip().splitlines() == ci
