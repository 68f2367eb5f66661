"""``graph_transformer``: a diffusers DiT/PixArt called by its own pipeline through replayed steps. On the CPU the
graph is replaced by a stand-in with ``GraphedStep``'s buffer contract (static input buffers, one output buffer the
next replay overwrites): it checks the wrapper (binding, keys, copies, pipeline integration) but reruns Python at
every call, so what only a real capture fixes (addresses, host values) is the GPU test's."""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from tiny_diffusers import tiny_dit, tiny_dit_pipeline, tiny_pixart_pipeline  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from cli_refusal import refused  # noqa: E402
from treeq_engine.runtime.graphed_diffusers import (graph_count, graph_pipeline, graph_transformer,  # noqa: E402
                                                    is_graphed, reset_graphs, ungraph_pipeline)

pytestmark = pytest.mark.usefixtures("one_thread")


class StandInStep:
    """``GraphedStep`` without CUDA: inputs copied into static buffers, the result written into one output buffer
    that every call overwrites (as a replay does), and the captures counted. It also records the address of every
    tensor the model holds (``StandInStep.model``) at capture, and a "replay" after any was replaced fails: that
    one a real graph would replay against stale memory."""
    captures = 0
    model = None

    def __init__(self, fn, example_inputs):
        StandInStep.captures += 1
        self.fn = fn
        self.static_inputs = [t.clone() for t in example_inputs]
        self.addresses = self._addresses()
        with torch.no_grad():
            self.static_output = fn(*self.static_inputs).clone()

    @staticmethod
    def _addresses():
        m = StandInStep.model
        return None if m is None else [t.data_ptr() for t in list(m.parameters()) + list(m.buffers())]

    def __call__(self, *inputs):
        assert self._addresses() == self.addresses, "a replay would read tensors that were replaced"
        for dst, src in zip(self.static_inputs, inputs):
            assert src.shape == dst.shape and src.dtype == dst.dtype
            dst.copy_(src)
        with torch.no_grad():
            self.static_output.copy_(self.fn(*self.static_inputs))
        return self.static_output


def test_a_dit_pipeline_samples_alike_through_replays(tmp_path):
    pipe = tiny_dit_pipeline()
    kw = dict(class_labels=[1, 2, 3], num_inference_steps=4, guidance_scale=1.5, output_type="np")
    want = pipe(generator=torch.manual_seed(0), **kw).images
    model = StandInStep.model = pipe.transformer
    StandInStep.captures = 0
    graph_pipeline(pipe, step_factory=StandInStep)
    assert pipe.transformer is model and is_graphed(model)     # the pipeline's own object, its class name kept
    assert isinstance(model, diffusers.DiTTransformer2DModel) and type(model).__name__ == "DiTTransformer2DModel"
    got = pipe(generator=torch.manual_seed(0), **kw).images
    np.testing.assert_array_equal(got, want)   # the runner's forward is the transformer's, bit for bit
    assert StandInStep.captures == 1 and graph_count(model) == 1   # one shape ([cond; uncond]), 4 replays
    pipe(class_labels=[4], num_inference_steps=2, guidance_scale=1.5, output_type="np")
    assert graph_count(model) == 2                                  # a new batch size: a new capture
    pipe.to(torch.float64)                      # moved or recast weights: the graphs would read stale addresses
    assert graph_count(model) == 0
    pipe.to(torch.float32)
    reset_graphs(model)
    # save_pretrained saves the transformer as it is, and it loads back as diffusers' own class
    pipe.save_pretrained(tmp_path / "p")
    back = diffusers.DiTPipeline.from_pretrained(tmp_path / "p")
    assert type(back.transformer) is diffusers.DiTTransformer2DModel
    np.testing.assert_array_equal(back(generator=torch.manual_seed(0), **kw).images, want)
    import copy

    with pytest.raises(TypeError, match="ungraph_transformer"):
        copy.deepcopy(model)
    # replaced tensors and modules: quantize forgets the graphs itself; after anything else, reset_graphs
    from treeq_engine.plan import QuantPlan
    from treeq_engine.runtime import quantize

    pipe(class_labels=[4], num_inference_steps=2, guidance_scale=1.5, output_type="np")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    with pytest.raises(AssertionError, match="replaced"):   # what a real replay would do silently
        pipe(class_labels=[4], num_inference_steps=2, guidance_scale=1.5, output_type="np")
    reset_graphs(model)
    pipe(class_labels=[4], num_inference_steps=2, guidance_scale=1.5, output_type="np")
    plan = QuantPlan.block_uniform(model, 8, 8)
    quantize(model, plan, dtype=torch.float32)
    assert graph_count(model) == 0
    pipe(class_labels=[4], num_inference_steps=2, guidance_scale=1.5, output_type="np")
    # a hook added after graphing is refused at the next capture (a replay would skip it)
    handle = model.transformer_blocks[1].register_forward_hook(lambda m, a, o: None)
    with pytest.raises(ValueError, match="carries hooks"):
        pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.5, output_type="np")
    handle.remove()
    # the graphed class reached through type(): an instance without graphs runs eagerly
    fresh = type(model).from_config(model.config)
    assert not is_graphed(fresh) and graph_count(fresh) == 0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 2])
    with torch.no_grad():
        assert fresh(x, t, y).sample.shape == (2, 8, 8, 8)
    ungraph_pipeline(pipe)
    StandInStep.model = None
    pipe = tiny_dit_pipeline()   # (an FP one again)
    model = pipe.transformer
    want = pipe(generator=torch.manual_seed(0), **kw).images
    for _ in range(2):   # graph, ungraph, and again: as before each time
        graph_pipeline(pipe, step_factory=StandInStep)
        np.testing.assert_array_equal(pipe(generator=torch.manual_seed(0), **kw).images, want)
        ungraph_pipeline(pipe)
        assert type(model) is diffusers.DiTTransformer2DModel and not is_graphed(model)
        np.testing.assert_array_equal(pipe(generator=torch.manual_seed(0), **kw).images, want)


def test_a_pixart_pipeline_samples_alike_through_replays():
    pytest.importorskip("transformers", reason="PixArt's pipeline needs transformers (T5)")
    pipe = tiny_pixart_pipeline()
    kw = dict(prompt=["a red cat", "a blue house on the hill"], num_inference_steps=3, output_type="latent")
    want = pipe(generator=torch.manual_seed(0), **kw).images
    graph_pipeline(pipe, step_factory=StandInStep)
    got = pipe(generator=torch.manual_seed(0), **kw).images
    assert torch.equal(got, want)
    assert graph_count(pipe.transformer) == 1


def test_calls_outputs_and_errors():
    model = tiny_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        want = model(x, t, y).sample
    g = graph_transformer(model, step_factory=StandInStep)
    with torch.no_grad():
        first = g(x, timestep=t, class_labels=y).sample
        second = g(x + 1, timestep=t, class_labels=y, return_dict=False)[0]
    assert torch.equal(first, want)                    # a copy: the next replay did not overwrite it
    assert not torch.equal(second, first)
    with pytest.raises(ValueError, match="cross_attention_kwargs"):   # what the runner cannot reproduce
        g(x, timestep=t, class_labels=y, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(TypeError, match="DiTTransformer2DModel: .*unexpected keyword"):
        g(x, timestep=t, class_labels=y, prompt="a cat")
    with pytest.raises(TypeError, match="takes a diffusers transformer .*got Linear"):
        graph_transformer(torch.nn.Linear(2, 2), step_factory=StandInStep)
    hooked = tiny_dit()
    hooked.transformer_blocks[0].register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(ValueError, match="carries hooks .*transformer_blocks.0: _forward_pre_hooks"):
        graph_transformer(hooked, step_factory=StandInStep)
    assert not is_graphed(hooked) and type(hooked) is diffusers.DiTTransformer2DModel   # refused before any change
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="need a CUDA device"):
            graph_transformer(tiny_dit())

    # PixArt: latents of one token count in two aspect ratios, one graph each (the grid is per shape)
    from tiny_diffusers import tiny_pixart

    px = tiny_pixart()
    enc = torch.randn(1, 5, 24)
    cond = {"resolution": None, "aspect_ratio": None}
    shapes = ((8, 16), (16, 8))
    latents = [torch.randn(1, 4, *hw) for hw in shapes]
    with torch.no_grad():
        want = [px(x, enc, torch.tensor([3]), added_cond_kwargs=cond).sample for x in latents]
        graph_transformer(px, step_factory=StandInStep)
        got = [px(x, enc, torch.tensor([3]), added_cond_kwargs=cond).sample for x in latents]
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and graph_count(px) == 2


@pytest.mark.parametrize("name", ["sd3", "flux", "sana"])
def test_other_transformers_replay_their_own_forward(name):
    """SD3, Flux, Sana: captured through their own forward, tensors as inputs, the rest in the key."""
    from tiny_diffusers import pack_only_models

    model, kw = pack_only_models()[name]
    with torch.no_grad():
        want = model(**kw).sample
        StandInStep.captures = 0
        graph_transformer(model, step_factory=StandInStep)
        assert torch.equal(model(**kw).sample, want)
        again = {k: v + 1 if k == "hidden_states" else v for k, v in kw.items()}
        assert not torch.equal(model(**again, return_dict=False)[0], want)   # one capture, a second replay
        assert StandInStep.captures == 1 and graph_count(model) == 1
        # a non-tensor argument is part of the key: another value, another capture
        other = {"sd3": {"skip_layers": [0]}, "flux": {"joint_attention_kwargs": {}},
                 "sana": {"attention_kwargs": {}}}[name]
        model(**kw, **other)
        assert graph_count(model) == 2
        if name == "sd3":   # a value a key cannot compare is refused
            with pytest.raises(TypeError, match="argument 'joint_attention_kwargs' is a Tensor"):
                model(**kw, joint_attention_kwargs={"scale": torch.ones(1)})
    ungraph_pipeline(type("Pipe", (), {"transformer": model})())
    assert not is_graphed(model)
    if name == "flux":   # an empty hook registry (a pipeline's cache_context leaves one) is fine; a cache is not
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(model)
        graph_transformer(model, step_factory=StandInStep)
        ungraph_pipeline(type("Pipe", (), {"transformer": model})())
        model.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.2))
        with pytest.raises(ValueError, match="carries hooks"):
            graph_transformer(model, step_factory=StandInStep)


def test_a_flux_pipeline_samples_alike_through_replays():
    pytest.importorskip("transformers", reason="Flux's pipeline needs transformers (CLIP, T5)")
    from tiny_diffusers import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    kw = dict(prompt=["a red cat", "a dog"], num_inference_steps=3, height=16, width=16, max_sequence_length=16,
              output_type="latent")
    want = pipe(generator=torch.manual_seed(0), **kw).images
    graph_pipeline(pipe, step_factory=StandInStep)
    got = pipe(generator=torch.manual_seed(0), **kw).images
    assert torch.equal(got, want) and graph_count(pipe.transformer) == 1


def test_both_experts_of_a_two_expert_pipeline_replay():
    """Wan 2.2 A14B's pipeline: graph_pipeline graphs transformer and transformer_2 (each captures its calls), the
    video as without graphs; ungraph_pipeline restores both."""
    from tiny_diffusers import tiny_wan_a14b_pipeline

    pipe = tiny_wan_a14b_pipeline()   # (skips without transformers)
    kw = dict(prompt="a red cat", num_inference_steps=4, height=16, width=16, num_frames=5, output_type="latent")
    want = pipe(generator=torch.manual_seed(0), **kw).frames
    graph_pipeline(pipe, step_factory=StandInStep)
    assert is_graphed(pipe.transformer) and is_graphed(pipe.transformer_2)
    assert torch.equal(pipe(generator=torch.manual_seed(0), **kw).frames, want)
    assert graph_count(pipe.transformer) >= 1 and graph_count(pipe.transformer_2) >= 1
    ungraph_pipeline(pipe)
    assert not is_graphed(pipe.transformer) and not is_graphed(pipe.transformer_2)


def test_sample_command_graph_needs_cuda(tmp_path):
    pipe_dir = tmp_path / "pipe"
    tiny_dit_pipeline().save_pretrained(pipe_dir)
    refused("needs --device cuda", ["sample", "--pipeline", str(pipe_dir), "--graph", "--device", "cpu"])


def eager_then_graphed(pipe, kw, plan):
    """(eager, graphed) outputs of ``pipe(**kw)`` from one seed: full precision, then quantized by ``plan``
    (float32 packed layers); one graph each time."""
    from treeq_engine.runtime import quantize

    for quantized in (False, True):
        if quantized:
            quantize(pipe.transformer, plan, dtype=torch.float32)
        want = pipe(generator=torch.manual_seed(0), **kw).images
        graph_pipeline(pipe)
        got = pipe(generator=torch.manual_seed(0), **kw).images
        assert graph_count(pipe.transformer) == 1
        ungraph_pipeline(pipe)
        yield want, got


@pytest.mark.gpu
def test_real_graphs_on_cuda(tmp_path):
    """Real CUDA graphs: a DiT pipeline (FP, then quantized W4A8 through the runtime) samples what it samples
    eagerly; and `treeq sample --pipeline --graph` runs."""
    from treeq_engine.plan import QuantPlan

    pipe = tiny_dit_pipeline().to("cuda")
    kw = dict(class_labels=[1, 2, 3], num_inference_steps=4, guidance_scale=1.5, output_type="np")
    for want, got in eager_then_graphed(pipe, kw, QuantPlan.block_uniform(pipe.transformer, 4, 8)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # PixArt (captions, their mask, the caption projection), in bf16: a replay at every step
    pytest.importorskip("transformers", reason="PixArt's pipeline needs transformers (T5)")
    px = tiny_pixart_pipeline().to("cuda", torch.bfloat16)
    kw = dict(prompt=["a red cat", "a blue house on the hill"], num_inference_steps=3, output_type="latent")
    want = px(generator=torch.manual_seed(0), **kw).images
    graph_pipeline(px)
    got = px(generator=torch.manual_seed(0), **kw).images
    assert graph_count(px.transformer) == 1
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-3, atol=5e-3)   # the same kernels, replayed
    from treeq_engine.cli import main

    pipe_dir = tmp_path / "pipe"
    tiny_dit_pipeline().save_pretrained(pipe_dir)
    assert main(["sample", "--pipeline", str(pipe_dir), "--graph", "--labels", "1,2", "--steps", "3",
                 "--device", "cuda", "--out", str(tmp_path / "g.png")]) == 0


@pytest.mark.gpu
def test_real_graphs_on_cuda_other_transformers():
    """Real CUDA graphs of a transformer captured through its own forward: a Flux pipeline, FP and W8A8."""
    pytest.importorskip("transformers", reason="Flux's pipeline needs transformers (CLIP, T5)")
    from tiny_diffusers import tiny_flux_pipeline

    from treeq_engine.plan import QuantPlan

    pipe = tiny_flux_pipeline().to("cuda")
    kw = dict(prompt=["a red cat", "a dog"], num_inference_steps=3, height=16, width=16, max_sequence_length=16,
              output_type="latent")
    for want, got in eager_then_graphed(pipe, kw, QuantPlan.block_uniform(pipe.transformer, 8, 8)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sd3", "sana", "flux"])
def test_packed_transformers_on_cuda_without_a_pipeline(name):
    """Needs no transformers: tiny SD3, Sana (its feed-forward's pointwise convolutions packed) and Flux (its
    blocks fused) at W4A8 run the CUDA kernels close to the CPU reference, and a real graph captured through their
    own forward replays what they compute eagerly."""
    import copy

    from tiny_diffusers import pack_only_models

    from treeq_engine.plan import QuantPlan
    from treeq_engine.runtime import TreeQPointwiseConv, quantize, set_layout, treeq_layers

    model, kw = pack_only_models()[name]
    plan = QuantPlan.block_uniform(model, 4, 8, pointwise_convs=True)
    quantize(model, plan, dtype=torch.float32)
    if name == "sana":
        assert any(isinstance(m, TreeQPointwiseConv) for m in treeq_layers(model).values())
    if name == "flux":
        assert type(model.single_transformer_blocks[0]).__name__ == "FusedFluxSingleTransformerBlock"
    with torch.no_grad():
        ref = model(**kw).sample   # the CPU reference backend
        gpu = copy.deepcopy(model).cuda()
        assert set_layout(gpu)["frag"] > 0   # the CUDA kernels' layout: they run these layers
        kc = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        eager = gpu(**kc).sample
        # a rounding tie may land one code apart between the kernels and the reference: close, not equal
        assert float((eager.cpu() - ref).norm() / ref.norm()) < 1e-2
        graph_transformer(gpu)
        first = gpu(**kc).sample.clone()
        again = gpu(**kc).sample
        assert graph_count(gpu) == 1
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
