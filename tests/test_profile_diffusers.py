"""`treeq profile --diffusers` finds the rows it times by running the search's runner on a weightless (meta device)
copy of the transformer, on a calibration file's shapes (`runtime.profile.diffusers_rows`). Every runner must run
there: position ids, videos, grids and masks hold no values on the meta device, so what a runner reads back from
its inputs it must take from what ``inputs()`` recorded. One tiny model per runner not covered by its own
model's profile test (SD3, Flux, Z-Image, FLUX.2 with references have theirs)."""
import pytest

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.runtime.profile import diffusers_rows  # noqa: E402
from treeq_engine.search import make_runner  # noqa: E402
from treeq_engine.search.diffusers_runner import save_inputs  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")]


def _ltx():
    from test_search_ltx import call
    from tiny_diffusers import tiny_ltx

    return tiny_ltx(), call(), 2 * 4 * 6   # (a 2x4x6 latent video)


def _chroma():
    from test_search_chroma import call
    from tiny_diffusers import tiny_chroma

    return tiny_chroma(), call(), 12


def _wan():
    from test_search_wan import call, tiny_wan

    model = tiny_wan(image=True)
    return model, call(model), 3 * 4 * 3   # (3x8x6 latents in 1x2x2 patches)


def _qwen():
    from test_search_qwen import call
    from tiny_diffusers import tiny_qwen

    return tiny_qwen(), call(), 4 * 6


def _sana():
    from test_search_sana import call
    from tiny_diffusers import tiny_sana

    return tiny_sana(), call(), 8 * 8


def _ltx_i2v():   # per-token timesteps: the conditioning frame's mask is made on the meta device too
    from test_search_ltx import i2v_call
    from tiny_diffusers import tiny_ltx

    return tiny_ltx(), i2v_call(), 2 * 4 * 6


def _wan_ti2v():
    from test_search_wan import ti2v_call, tiny_wan

    model = tiny_wan()
    return model, ti2v_call(model), 3 * 4 * 3


@pytest.mark.parametrize("build", [_ltx, _ltx_i2v, _chroma, _wan, _wan_ti2v, _qwen, _sana],
                         ids=["ltx", "ltx-i2v", "chroma", "wan", "wan-ti2v", "qwen", "sana"])
def test_the_runner_runs_on_a_weightless_copy(build, tmp_path):
    pytest.importorskip("accelerate", reason="diffusers loads Wan (float32-kept modules) only with accelerate")
    model, kw, image_tokens = build()
    model.save_pretrained(tmp_path / "model")
    runner = make_runner(model)
    calib = str(tmp_path / "calib.safetensors")
    save_inputs(calib, runner, runner.inputs(**kw))
    rows = diffusers_rows(str(tmp_path / "model"), calib, [1, 2])
    assert rows and all(k > 0 and n > 0 and r > 0 for k, n, r in rows)
    assert any(r == image_tokens for _, _, r in rows) and any(r == 2 * image_tokens for _, _, r in rows)
