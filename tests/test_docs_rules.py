"""The worked example of docs/rules.md ("How to add a rule") runs as it is written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "rules.md"


def example(tag: str) -> str:
    """The ```python block that follows ``<!-- example: tag -->`` in docs/rules.md."""
    match = re.search(rf"<!-- example: {re.escape(tag)} -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/rules.md has no example {tag!r}"
    return match.group(1)


def test_the_add_a_rule_example_runs_and_its_rule_works(tmp_path: Path) -> None:
    # In a fresh interpreter, so that the new rule does not join the registry of this test session.
    check = '''
assert "fa_drift" in bioprop.list_rules()
assert dict(bioprop.describe_rules())["fa_drift"].startswith("feedback alignment whose B drifts")
assert bioprop.rule_options("fa_drift") == {"scale": "xiao2018", "rate": 0.1}
try:
    bioprop.convert(nn.Linear(2, 2), "fa_drift", rate=2.0)
except ValueError as err:
    assert "rate must be a number in [0, 1]" in str(err)
else:
    raise AssertionError("rate=2.0 was accepted")
# independent reference for the input gradient: dL/dx = dL/dy · B
layer = bioprop.convert(nn.Sequential(nn.Linear(3, 2)).double(), "fa_drift", seed=1)
xi = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
gy = torch.randn(5, 2, dtype=torch.float64)
layer(xi).backward(gy)
torch.testing.assert_close(xi.grad, gy @ layer[0].feedback_weight)
print("ok")
'''
    script = tmp_path / "example.py"
    script.write_text(example("add-a-rule") + check)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("ok") and "fa_drift" in done.stdout
