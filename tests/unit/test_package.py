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
