import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py builds the small test graphs

import onnx  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def mlp_path(tmp_path):
    """The small MLP of tests/models.py saved as a file, in a directory of its own."""
    import models
    p = tmp_path / "in" / "mlp.onnx"
    p.parent.mkdir()
    onnx.save(models.mlp(), p)
    return p


@pytest.fixture
def reference_wins(monkeypatch):
    """Makes the plan check ship its reference GPTQ contender, whatever it measured."""
    import bayesq_onnx.api as api
    real = api.check_plans

    def pick_reference(contenders, *args):
        i, rep = real(contenders, *args)
        j = next(k for k, c in enumerate(contenders) if c.reference)
        return j, {**rep, "chosen": contenders[j].plan.label}

    monkeypatch.setattr(api, "check_plans", pick_reference)
