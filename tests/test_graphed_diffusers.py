"""``GraphedTransformer``: a diffusers DiT/PixArt called by its own pipeline through replayed steps. On the CPU the
graph is replaced by a stand-in with ``GraphedStep``'s contract (static input buffers, one output buffer the next
replay overwrites), which checks everything but the capture; the GPU test captures real CUDA graphs."""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from tiny_diffusers import tiny_dit, tiny_dit_pipeline, tiny_pixart_pipeline  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from treeq_engine.runtime.graphed_diffusers import GraphedTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class StandInStep:
    """``GraphedStep`` without CUDA: inputs copied into static buffers, the result written into one output buffer
    that every call overwrites (as a replay does), and the captures counted."""
    captures = 0

    def __init__(self, fn, example_inputs):
        StandInStep.captures += 1
        self.fn = fn
        self.static_inputs = [t.clone() for t in example_inputs]
        with torch.no_grad():
            self.static_output = fn(*self.static_inputs).clone()

    def __call__(self, *inputs):
        for dst, src in zip(self.static_inputs, inputs):
            assert src.shape == dst.shape and src.dtype == dst.dtype
            dst.copy_(src)
        with torch.no_grad():
            self.static_output.copy_(self.fn(*self.static_inputs))
        return self.static_output


def test_a_dit_pipeline_samples_alike_through_replays():
    pipe = tiny_dit_pipeline()
    kw = dict(class_labels=[1, 2, 3], num_inference_steps=4, guidance_scale=1.5, output_type="np")
    want = pipe(generator=torch.manual_seed(0), **kw).images
    eager = pipe.transformer
    StandInStep.captures = 0
    pipe.transformer = GraphedTransformer(eager, step_factory=StandInStep)
    got = pipe(generator=torch.manual_seed(0), **kw).images
    np.testing.assert_array_equal(got, want)   # the runner's forward is the transformer's, bit for bit
    assert StandInStep.captures == 1 and pipe.transformer.graphs == 1   # one shape ([cond; uncond]), 4 replays
    pipe(class_labels=[4], num_inference_steps=2, guidance_scale=1.5, output_type="np")
    assert pipe.transformer.graphs == 2                                  # a new batch size: a new capture
    assert pipe.transformer.config.in_channels == 4 and pipe.transformer.dtype == torch.float32
    pipe.transformer.reset()
    assert pipe.transformer.graphs == 0


def test_a_pixart_pipeline_samples_alike_through_replays():
    pytest.importorskip("transformers", reason="PixArt's pipeline needs transformers (T5)")
    pipe = tiny_pixart_pipeline()
    kw = dict(prompt=["a red cat", "a blue house on the hill"], num_inference_steps=3, output_type="latent")
    want = pipe(generator=torch.manual_seed(0), **kw).images
    pipe.transformer = GraphedTransformer(pipe.transformer, step_factory=StandInStep)
    got = pipe(generator=torch.manual_seed(0), **kw).images
    assert torch.equal(got, want)
    assert pipe.transformer.graphs == 1


def test_calls_outputs_and_errors():
    model = tiny_dit()
    g = GraphedTransformer(model, step_factory=StandInStep)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        want = model(x, t, y).sample
        first = g(x, timestep=t, class_labels=y).sample
        second = g(x + 1, timestep=t, class_labels=y, return_dict=False)[0]
    assert torch.equal(first, want)                    # a copy: the next replay did not overwrite it
    assert not torch.equal(second, first)
    with pytest.raises(ValueError, match="cross_attention_kwargs"):   # what the runner cannot reproduce
        g(x, timestep=t, class_labels=y, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(TypeError, match="DiTTransformer2DModel: .*unexpected keyword"):
        g(x, timestep=t, class_labels=y, prompt="a cat")
    with pytest.raises(TypeError, match="DiffusersRunner cuts"):
        GraphedTransformer(torch.nn.Linear(2, 2), step_factory=StandInStep)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            GraphedTransformer(model)


def test_sample_command_graph_needs_cuda(tmp_path):
    from treeq_engine.cli import main

    pipe_dir = tmp_path / "pipe"
    tiny_dit_pipeline().save_pretrained(pipe_dir)
    with pytest.raises(SystemExit, match="needs --device cuda"):
        main(["sample", "--pipeline", str(pipe_dir), "--graph", "--device", "cpu"])


@pytest.mark.gpu
def test_real_graphs_on_cuda(tmp_path):
    """Real CUDA graphs: a DiT pipeline (FP, then quantized W4A8 through the runtime) samples what it samples
    eagerly; and `treeq sample --pipeline --graph` runs."""
    from treeq_engine.plan import QuantPlan
    from treeq_engine.runtime import quantize

    pipe = tiny_dit_pipeline().to("cuda")
    kw = dict(class_labels=[1, 2, 3], num_inference_steps=4, guidance_scale=1.5, output_type="latent")
    for quantized in (False, True):
        if quantized:
            quantize(pipe.transformer, QuantPlan.block_uniform(pipe.transformer, 4, 8), dtype=torch.float32)
        want = pipe(generator=torch.manual_seed(0), **kw).images
        eager = pipe.transformer
        pipe.transformer = GraphedTransformer(eager)
        got = pipe(generator=torch.manual_seed(0), **kw).images
        pipe.transformer = eager
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from treeq_engine.cli import main

    pipe_dir = tmp_path / "pipe"
    tiny_dit_pipeline().save_pretrained(pipe_dir)
    assert main(["sample", "--pipeline", str(pipe_dir), "--graph", "--labels", "1,2", "--steps", "3",
                 "--device", "cuda", "--out", str(tmp_path / "g.png")]) == 0
