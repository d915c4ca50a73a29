"""fusedkd.integrations without its optional dependencies: trl stays optional, and heads whose
logits are scaled or soft-capped are refused with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_without_trl_fusedkd_imports_and_the_trl_integration_names_the_extra():
    # sys.modules["trl"] = None makes `import trl` fail as if it were not installed.
    proc = run_python(
        "import sys\n"
        "sys.modules['trl'] = None\n"
        "import fusedkd, fusedkd.integrations\n"
        "assert 'trl' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    import fusedkd.integrations.trl\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "else:\n"
        "    print('imported')\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        'ImportError: fusedkd.integrations.trl needs TRL >= 1.16: install it with pip install "fusedkd[trl]"'
        in (proc.stdout)
    ), proc.stdout


def test_importing_fusedkd_imports_neither_trl_nor_transformers():
    proc = run_python(
        "import sys, fusedkd, fusedkd.integrations\n"
        "print(sorted(m for m in ('trl', 'transformers') if m in sys.modules))\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def _tiny_qwen3():
    transformers = pytest.importorskip("transformers", reason="the train extra is not installed")
    config = transformers.Qwen3Config(
        vocab_size=97,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    return transformers.Qwen3ForCausalLM(config)


@pytest.mark.parametrize(
    ("attribute", "value", "expected"),
    [
        ("final_logit_softcapping", 30.0, {"teacher_logit_scale": 1.0, "teacher_softcap": 30.0}),
        ("logit_scale", 0.0625, {"teacher_logit_scale": 0.0625, "teacher_softcap": None}),
        ("logits_scaling", 8.0, {"teacher_logit_scale": 0.125, "teacher_softcap": None}),
    ],
)
def test_scaled_or_softcapped_heads_pass_their_own_values(attribute, value, expected):
    from fusedkd.integrations._common import check_head, head_options

    model = _tiny_qwen3()
    check_head(model, "the teacher")  # a plain head passes
    assert head_options(model, "teacher") == {"teacher_logit_scale": 1.0, "teacher_softcap": None}
    setattr(model.config, attribute, value)
    check_head(model, "the teacher")
    assert head_options(model, "teacher") == expected
    setattr(model.config, attribute, -1.0)
    with pytest.raises(ValueError, match=rf"the teacher: config.{attribute} must be"):
        check_head(model, "the teacher")


@pytest.mark.parametrize(("attribute", "value"), [("output_multiplier", 2.0), ("lm_head_multiplier", 0.5)])
def test_other_head_multipliers_are_refused(attribute, value):
    from fusedkd.integrations._common import check_head

    model = _tiny_qwen3()
    for neutral in (None, 1, 1.0):  # unset or a unit multiplier changes nothing
        setattr(model.config, attribute, neutral)
        check_head(model, "the teacher")
    setattr(model.config, attribute, value)
    with pytest.raises(ValueError, match=rf"the teacher: the model's logits use {attribute}={value}"):
        check_head(model, "the teacher")


def test_a_module_that_is_not_a_causal_lm_is_refused():
    pytest.importorskip("transformers", reason="the train extra is not installed")
    import torch

    from fusedkd.integrations._common import check_head

    with pytest.raises(ValueError, match="model must be a transformers causal LM"):
        check_head(torch.nn.Linear(3, 3), "model")


def test_forward_redirection_runs_the_method_inside_the_wrapper_and_restores_forward():
    import torch

    from fusedkd.integrations._common import ForwardRedirection

    class Wrapper(torch.nn.Module):  # stands in for DDP: its forward calls the module's
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    inner = torch.nn.Linear(2, 2)
    wrapper = Wrapper(inner)
    seen = []
    out = ForwardRedirection()(
        wrapper, inner, lambda x, scale: seen.append(x) or scale * x, torch.ones(2), scale=3
    )
    assert wrapper.calls == 1 and len(seen) == 1 and torch.equal(out, torch.full((2,), 3.0))
    assert "forward" not in inner.__dict__  # the class's forward again
    # An instance-level forward (accelerate's autocast wrapper) is put back, also after an error.
    patched = inner.forward = lambda x: x
    try:
        ForwardRedirection()(wrapper, inner, lambda x: 1 / 0, torch.ones(2))
    except ZeroDivisionError:
        pass
    assert inner.__dict__["forward"] is patched
