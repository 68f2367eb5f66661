"""The search's generic cut (``GenericRunner``) of diffusers transformers without a cut of their own (tiny random
configs of the zoo, offline): each is cut bit for bit or refused with the reason; the cut follows the call order of
the blocks and where each linear runs; ties follow the traced inputs; the evaluator agrees with a brute-force oracle
on the model's own forward; calibration files keep the input spec; and the command line captures an AuraFlow
pipeline, searches, calibrates, fine-tunes, packs and samples it."""
import copy
import json
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency (requirements-dev.txt)")

from diffusers_zoo import CASES  # noqa: E402
from pipeline_flow import ptq_peft_packed, searched_beats_uniform  # noqa: E402
from test_search_mmdit import check_evaluator  # noqa: E402
from tiny_diffusers import perturbed  # noqa: E402
from tinydit import one_thread  # noqa: E402,F401

from cli_refusal import refused  # noqa: E402
from treeq_engine.search import make_runner  # noqa: E402
from treeq_engine.search.diffusers_runner import diffusers_arch, load_inputs, save_inputs  # noqa: E402
from treeq_engine.search.evaluator import run_segments  # noqa: E402
from treeq_engine.search.generic_runner import GenericRunner, block_lists, generic_arch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# what the generic cut refuses in the zoo, and why: when it checks the cut, or already the call's arguments
REFUSED = {"HiDreamImage": "fails on the first sample of these inputs alone",   # (a (layers, N, ...) input)
           "WanVACE": "does not give the model's output",   # (control hints added between the blocks)
           "Latte": "needs batch-first block outputs",   # (its blocks fold frames into the batch)
           "BriaFibo": "does not give the model's output"}   # (each block reads its own text encoder layer)
REFUSED_CALLS = {"DreamLite": "without a timestep tensor",   # (a part of the DreamLite UNet, called without one)
                 "WanAnimate2": "a WanAnimate2KVCache argument is not supported",   # (a cache an earlier call fills)
                 "SanaWMLTX2Refiner": "a SanaWMRefinerKVCache argument is not supported",   # (likewise)
                 "OmniGen": "takes no keyword-argument mappings",   # (its input image sizes, a dict)
                 "JoyImageEditPlus": "its items differ"}   # (each sample's own target and reference shapes)
GENERIC = sorted(n for n, (ctor, _) in CASES.items() if generic_arch(ctor()) is not None and
                 type(make_runner(ctor())) is GenericRunner)


def zoo(name, seed=0):
    """A zoo model (random weights) and the keyword arguments of one call."""
    ctor, inputs = CASES[name]
    torch.manual_seed(0)
    model = ctor().eval()
    g = torch.Generator().manual_seed(seed)
    return model, inputs(lambda *shape: torch.randn(*shape, generator=g))


def traced(model, kw):
    runner = make_runner(model)
    state = runner.inputs(**kw)
    runner.check(state)
    return runner, state


def test_the_zoo_takes_the_generic_cut():
    assert {"HunyuanVideo", "CogVideoX", "Lumina2", "Mochi", "Cosmos", "AuraFlow"} <= set(GENERIC)
    assert not {"Wan", "QwenImage", "Flux2", "Sana"} & set(GENERIC)   # (cut by their own runners)


def test_a_list_with_an_item_per_sample_is_one_constant_rebuilt_for_each_batch():
    """NucleusMoE (and Qwen-Image 2.1) take ``img_shapes`` as ``[shape] * batch``: the cut keeps one item and
    rebuilds the list for each batch it runs, tuples as tuples after the calibration file's JSON; samples whose
    items differ are refused."""
    model, kw = zoo("NucleusMoEImage")
    runner = make_runner(model)
    state = runner.inputs(**kw)
    fresh = GenericRunner(model)   # (as a search reading the calibration file builds it)
    fresh.configure(json.loads(json.dumps(runner.metadata())), "calibration file")
    three = tuple(torch.cat([t] * 3) for t in state)
    assert fresh._kwargs(three)["img_shapes"] == [(1, 4, 4)] * 3
    fresh.check(three)
    with torch.no_grad():
        want = model(**kw).sample
        for got in run_segments(fresh, three).chunk(3):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    two = dict(kw, **{k: torch.cat([v, v]) for k, v in kw.items() if k != "timestep" and isinstance(v, torch.Tensor)})
    with pytest.raises(ValueError, match="img_shapes: a list as long as the call's batch .* its items differ"):
        GenericRunner(model).inputs(**dict(two, timestep=torch.cat([kw["timestep"]] * 2),
                                           img_shapes=[(1, 4, 4), (1, 2, 8)]))


@pytest.mark.parametrize("name", GENERIC)
def test_each_is_cut_bit_for_bit_or_refused_with_the_reason(name):
    model, kw = zoo(name)
    runner = make_runner(model)
    assert make_runner(model) is runner and diffusers_arch(model) == runner.arch == f"generic:{type(model).__name__}"
    if name in REFUSED_CALLS:
        with pytest.raises(ValueError, match=REFUSED_CALLS[name]):
            runner.inputs(**kw)
        return
    state = runner.inputs(**kw)
    if name in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[name]):
            runner.check(state)
        with pytest.raises(RuntimeError, match=r"check\(inputs\) first"):
            runner.run(1, state)
        return
    runner.check(state)
    with torch.no_grad():
        out = model(**kw, return_dict=False)   # (a tuple; Kandinsky 5's a bare tensor)
        outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
        want = outs[0] if len(outs) == 1 else torch.cat([o.flatten(1) for o in outs], 1)   # (LTX-2: video, audio)
        assert torch.equal(run_segments(runner, state), want)
    assert runner.num_segments == len(runner._order) + 2 <= sum(len(m) for _, m in block_lists(model)) + 2
    segments = [runner.segment_of(n) for n in runner._segment]
    assert min(segments) == 0 and max(segments) == runner.num_segments - 1


def test_block_lists_in_a_module_dict_are_segments_where_the_call_reaches_them():
    """FLUX.3 keeps its image modes' blocks in a ModuleDict of lists: each block is a segment (not code re-run
    around every later block), and a list the call does not reach (the reference image's, in text to image) is no
    segment of that cut; a list reached in part is refused."""
    from test_flux3_fused import call, tiny_flux3

    model = tiny_flux3()
    assert [n for n, _ in block_lists(model)] == ["mode_blocks.image", "mode_blocks.image_cond", "txt_mode_blocks",
                                                   "single_transformer_blocks"]
    for cond, segments in ((True, 2 * 4 + 2), (False, 2 * 3 + 2)):
        kw = call(cond=cond)
        runner = GenericRunner(model)
        state = runner.inputs(**kw)
        runner.check(state)
        assert runner.num_segments == segments
        assert runner.segment_of("mode_blocks.image.1.attn.to_q") == 4   # (after the text's two blocks)
        with torch.no_grad():
            assert torch.equal(run_segments(runner, state), model(**kw).sample)
        if not cond:
            with pytest.raises(ValueError, match="mode_blocks.image_cond.0.attn.to_q did not run"):
                runner.segment_of("mode_blocks.image_cond.0.attn.to_q")


    class FirstOnly(torch.nn.ModuleList):   # (a forward that calls the image's first block only)
        def __iter__(self):
            return iter([self[0]])

    model.mode_blocks["image"] = FirstOnly(model.mode_blocks["image"])
    runner = GenericRunner(model)
    with pytest.raises(ValueError, match=r"does not call blocks \['mode_blocks.image.1'\].*every block of a list it"):
        runner.check(runner.inputs(**call()))
    assert runner.num_segments == len(runner._blocks) + 2 and runner._order is None   # (reset by the refusal)


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


class Reach(torch.nn.Module):
    """A toy transformer whose ``extra`` blocks run only on sequences longer than 4 tokens."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Residual() for _ in range(2))
        self.extra = torch.nn.ModuleList([Residual()])

    def forward(self, hidden_states, timestep):
        x = hidden_states * timestep[:, None, None]
        for b in self.blocks:
            x = b(x)
        if x.shape[1] > 4:
            for b in self.extra:
                x = b(x)
        return (x,)


def test_one_runner_cuts_calls_of_one_reach():
    """A check whose calls reach other blocks than an earlier check's is refused: the cut (call order, segments,
    where each linear runs) is one per runner, and would silently no longer be the earlier file's."""
    torch.manual_seed(0)
    runner = GenericRunner(Reach())
    short = runner.inputs(hidden_states=torch.randn(2, 4, 8), timestep=torch.rand(2))
    runner.check(short)
    assert runner.num_segments == 2 + 2
    with pytest.raises(ValueError, match=r"reach blocks .* \(3\), an earlier check's 2"):
        runner.check(runner.inputs(hidden_states=torch.randn(2, 8, 8), timestep=torch.rand(2)))


def test_sequence_first_blocks_are_cut_with_their_samples_moved_first():
    """ERNIE-Image's blocks take and give (S, B, H): the cut finds the samples' dim of each block's output (the one
    that doubles with two copies of the sample), keeps the state batch-first (what the search stacks candidates
    along) and hands each stand-in's output back sequence-first, bit for bit."""
    model, kw = zoo("ErnieImage")
    runner = GenericRunner(model)
    state = runner.inputs(**kw)
    runner.check(state)
    assert runner._batch_dims == {f"layers.{i}": [1] for i in range(2)}
    mid = state
    for segment in range(2):
        mid = runner.run(segment, mid)
    assert all(t.shape[0] == 2 for t in mid)   # (the first block's output, batch-first)
    with torch.no_grad():
        assert torch.equal(run_segments(runner, state), model(**kw).sample)


def test_the_segments_follow_the_call_order_and_where_each_linear_runs():
    """Lumina2 defines noise_refiner, context_refiner, layers but calls the context refiner first; its embedders run
    before the blocks, its output norm and projection after."""
    model, kw = zoo("Lumina2")
    runner, state = traced(model, kw)
    assert runner._order == ["context_refiner.0", "noise_refiner.0", "layers.0", "layers.1"]
    assert runner._per_list[runner._kind(state)]   # (its joint blocks read the caption refiner's last output)
    assert runner.segment_of("context_refiner.0.attn.to_q") == 1 and runner.segment_of("noise_refiner.0.attn.to_q") == 2
    assert runner.segment_of("layers.1.feed_forward.linear_2") == 4
    assert runner.segment_of("time_caption_embed.caption_embedder.1") == 0
    assert runner.segment_of("norm_out.linear_2") == runner.num_segments - 1
    assert runner.tie("layers.0.attn.to_k") == runner.tie("layers.0.attn.to_q") == "layers.0.attn.to_q+to_k+to_v"
    assert runner.tie("layers.0.attn.to_out.0") is None


def test_the_state_keeps_the_latest_block_output_where_that_suffices():
    """HunyuanVideo's single-stream blocks read only the previous block's output: the state entering one holds the
    inputs and that output alone, not the dual-stream list's last output too."""
    runner, state = traced(*zoo("HunyuanVideo"))
    assert not runner._per_list[runner._kind(state)]
    assert runner._order == ["transformer_blocks.0", "single_transformer_blocks.0"]
    with torch.no_grad():
        states = [state]
        for s in range(runner.num_segments - 1):
            states.append(runner.run(s, states[-1]))
    n_in = len(runner.input_names)
    assert [len(st) - n_in for st in states] == [0, 0, 2, 2]   # (a block's output: hidden and text states)


def test_the_state_is_chosen_on_more_than_one_sample_and_per_kind_of_input():
    """What a forward reads may depend on the values: with the first sample's prompt all masked, Lumina2 reads no
    caption-refiner output for it, but does for the last sample, so each list's latest is kept (the first and last
    samples are held to the model). States cached for one file stay right after another of other shapes is checked
    (AuraFlow reads a stand-in's caption length after its single blocks)."""
    model, kw = zoo("Lumina2")
    kw["encoder_attention_mask"][0] = False
    runner, state = traced(model, kw)
    assert runner._per_list[runner._kind(state)]
    with torch.no_grad():
        got, want = run_segments(runner, state), model(**kw).sample
    assert torch.isfinite(got).all() and torch.equal(got, want)
    model, kw = zoo("AuraFlow")
    runner, a = traced(model, kw)
    with torch.no_grad():
        cached = a
        for s in range(runner.num_segments - 1):
            cached = runner.run(s, cached)
        b = runner.inputs(**{**kw, "encoder_hidden_states": torch.randn(2, 12, 32)})
        runner.check(b)
        assert torch.equal(runner.output(runner.run(runner.num_segments - 1, cached)), model(**kw).sample)
        with pytest.raises(RuntimeError, match="have not been through check"):
            runner.run(2, runner.inputs(**{**kw, "encoder_hidden_states": torch.randn(2, 5, 32)}))


def test_cross_attention_ties_only_what_reads_one_input():
    runner, _ = traced(*zoo("Cosmos"))
    assert runner.tie("transformer_blocks.0.attn2.to_k") == "transformer_blocks.0.attn2.to_k+to_v"
    assert runner.tie("transformer_blocks.0.attn2.to_q") is None   # (reads the video tokens, not the text)


def test_ties_need_the_very_same_tensor():
    """HunyuanVideo 1.5's second text embedder runs linear_2 -> GELU -> linear_3 at one width: the second GELU's output
    may land in the first's freed buffer, but the two linears read different tensors and are not tied."""
    runner, _ = traced(*zoo("HunyuanVideo15"))
    assert runner.tie("context_embedder_2.linear_3") is None and runner.tie("context_embedder_2.linear_2") is None
    assert runner.tie("transformer_blocks.0.attn.to_k") == "transformer_blocks.0.attn.to_q+to_k+to_v"


class Toy(torch.nn.Module):
    """Two blocks and a shift the caller passes once for all samples ((1, 4)), repeated to the batch inside."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.proj_out = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, timestep, shift, return_dict=False):
        h = hidden_states + timestep[:, None] + shift.repeat(hidden_states.shape[0], 1)
        for block in self.blocks:
            h = block(h)
        return (self.proj_out(h),)


def test_a_batch_of_one_cannot_tell_a_shared_input():
    """At one sample a (1, 4) input may be per sample or shared: the check's two copies of the sample tell, and a
    capture of batch 1 is refused saying so; a first call of two samples settles it for the later calls of one."""
    x, t, shift = torch.randn(2, 4), torch.tensor([3.0, 5.0]), torch.randn(1, 4)
    one = GenericRunner(Toy())
    state = one.inputs(hidden_states=x[:1], timestep=t[:1], shift=shift)
    with pytest.raises(ValueError, match="capture with a batch of 2 or more"):
        one.check(state)
    two = GenericRunner(Toy())
    first = two.inputs(hidden_states=x, timestep=t, shift=shift)   # (shared: 1 != 2)
    later = two.inputs(hidden_states=x[:1], timestep=t[:1], shift=shift)   # (1 == 1: as the first call had it)
    assert later[2].shape == (1, 1, 4)
    state = tuple(torch.cat([a, b]) for a, b in zip(first, later))
    two.check(state)
    with torch.no_grad():
        assert torch.equal(run_segments(two, state), two.model(torch.cat([x, x[:1]]), torch.cat([t, t[:1]]), shift)[0])
    with pytest.raises(ValueError, match="capture with a batch of 2 or more"):
        one.inputs(hidden_states=x, timestep=t, shift=shift)   # (the other way round: the first call could not tell)


def test_the_runner_leaves_the_model_as_it_found_it():
    """An instance forward a block already had (a hook's wrapper) is put back after each segment; the runner kept on
    the model does not keep it alive."""
    import gc
    import weakref

    model, kw = zoo("CogVideoX")
    block = model.transformer_blocks[0]
    calls: list = []

    def counted(forward):
        def wrapper(*a, **k):
            calls.append(1)
            return forward(*a, **k)
        return wrapper

    wrapper = block.forward = counted(block.forward)
    runner, state = traced(model, kw)
    assert block.__dict__["forward"] is wrapper and calls
    n = len(calls)
    with torch.no_grad():
        run_segments(runner, state)
    assert block.__dict__["forward"] is wrapper and len(calls) == n + 1   # (its own segment only: a stand-in after)
    ref = weakref.ref(model)
    del model, block, runner, wrapper
    gc.collect()
    assert ref() is None


def test_a_skip_connection_is_refused():
    """HunyuanDiT's later blocks add earlier blocks' outputs (a U-Net-like skip): the stand-ins' NaN shows it."""
    ctor, inputs = CASES["HunyuanDiT"]
    torch.manual_seed(0)
    model = diffusers.HunyuanDiT2DModel.from_config({**ctor().config, "num_layers": 4}).eval()
    g = torch.Generator().manual_seed(0)
    runner = make_runner(model)
    state = runner.inputs(**inputs(lambda *s: torch.randn(*s, generator=g)))
    with pytest.raises(ValueError, match="skip connection"):
        runner.check(state)


def padded_hunyuan(seed=0):
    """HunyuanVideo, two samples whose prompts of 12 tokens keep 8 and 10 (the zoo's model); the traced runner."""
    model, one = zoo("HunyuanVideo", seed)
    _, other = zoo("HunyuanVideo", seed + 1)
    kw = {k: torch.cat([v, other[k]]) if isinstance(v, torch.Tensor) else v for k, v in one.items()}
    kw["encoder_attention_mask"] = (torch.arange(12) < torch.tensor([[8], [10]])).float()
    runner, state = traced(model, kw)
    return model, runner, state


def test_ptq_statistics_leave_out_the_padding_the_output_never_reads(tmp_path):
    """HunyuanVideo's prompt mask hides the padding from the attention: the rows under its zeros reach no output, in
    the prompt's own linears (the token refiner, the dual-stream blocks' text side) and at the end of the
    single-stream blocks' joint rows; PTQ's statistics leave them out, and two calibration sets that differ only in
    what the padding holds calibrate bit for bit alike. The image rows, and every row of a model whose mask hides
    nothing (Cosmos's), count."""
    from treeq_engine.calib.capture import capture_inputs
    from treeq_engine.calib.ptq import PTQConfig, calibrate
    from treeq_engine.plan import QuantPlan

    model, runner, state = padded_hunyuan()
    assert runner.pads_rows
    image = 2 * 256
    refiner = "context_embedder.token_refiner.refiner_blocks.0"
    for name, rows in (("context_embedder.proj_in", 18), (f"{refiner}.ff.net.2", 18),
                       ("transformer_blocks.0.attn.add_k_proj", 18), ("transformer_blocks.0.ff_context.net.2", 18),
                       ("transformer_blocks.0.attn.to_q", image), ("single_transformer_blocks.0.proj_mlp", image + 18),
                       ("proj_out", image), ("time_text_embed.text_embedder.linear_1", 2)):
        assert capture_inputs(model, name, [state], max_tokens=10_000).shape[0] == rows, name
    keep = runner.real_rows("single_transformer_blocks.0.attn.to_k", state)
    assert keep.shape == (2, 268) and keep[:, :256].all() and keep[:, 256:].sum() == 18
    i = runner.input_names.index("encoder_hidden_states")
    junk = list(state)
    junk[i] = torch.where(state[runner.input_names.index("encoder_attention_mask")].bool()[..., None], state[i],
                          torch.randn_like(state[i]) * 50)
    plan = QuantPlan.block_uniform(model, 4, 8)
    cfg = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0, 0.8), a_clip_grid=(1.0, 0.9))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    calibrate(a, plan, [state], cfg, progress=False)
    calibrate(b, plan, [tuple(junk)], cfg, progress=False)
    for n in plan.layers:
        la, lb = a.get_submodule(n), b.get_submodule(n)
        assert torch.equal(la.w_codes, lb.w_codes) and la.config == lb.config, n
    model, kw = zoo("Cosmos")
    kw["attention_mask"][:, 8:] = 0   # (Cosmos takes a mask its attention does not read)
    runner, state = traced(model, kw)
    assert not runner.pads_rows and runner.real_rows("transformer_blocks.0.attn2.to_k", state) is None


def test_a_traced_rule_is_part_of_ptqs_state_and_a_batch_it_does_not_fit_counts_every_row(tmp_path):
    """A PTQ directory records the traced padding rules (a digest): begun with other rules (or none: padding
    counted), it is not resumed with these. A batch a rule does not fit (a model whose rows change with the batch's
    size) counts every row of it, with a warning, instead of failing."""
    import json

    from treeq_engine.calib.capture import capture_inputs
    from treeq_engine.calib.ptq import PTQConfig, calibrate
    from treeq_engine.calib.store import CheckpointError
    from treeq_engine.plan import QuantPlan

    model, runner, state = padded_hunyuan()
    plan = QuantPlan.block_uniform(model, 4, 8)
    cfg = PTQConfig(max_tokens=64, rounds=1, w_clip_grid=(1.0,), a_clip_grid=(1.0,))
    out = tmp_path / "ptq"
    calibrate(copy.deepcopy(model), plan, [state], cfg, progress=False, out_dir=out)
    saved = json.loads((out / "ptq.json").read_text())
    assert saved["rows"] == f"real:{runner.padding_digest()}"
    saved["rows"] = "real"   # (as a run whose statistics counted the padding)
    (out / "ptq.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="left out other padding rows"):
        calibrate(copy.deepcopy(model), plan, [state], cfg, progress=False, out_dir=out)
    saved["layers"] = {}   # (killed before its first layer: the new rules hold from the start, and are recorded)
    (out / "ptq.json").write_text(json.dumps(saved))
    calibrate(copy.deepcopy(model), plan, [state], cfg, progress=False, out_dir=out)
    assert json.loads((out / "ptq.json").read_text())["rows"] == f"real:{runner.padding_digest()}"
    calibrate(copy.deepcopy(model), plan, [state], cfg, progress=False, out_dir=out)   # (and resumes again)
    name = "transformer_blocks.0.attn.add_k_proj"
    rules = runner._padding[runner._kind(state)]
    i, at, rows = rules[name]
    rules[name] = (i, at, rows + 1)   # (a rule traced at another batch size)
    with pytest.warns(UserWarning, match="does not fit this batch's input"):
        assert capture_inputs(model, name, [state], max_tokens=10_000).shape[0] == 2 * 12


class Masked(torch.nn.Module):
    """Two blocks over tokens and a mask that hides the padding from the pooled output (``how="always"``), only in
    samples that mask more tokens than they keep (``"some"``), or hides it from the gradient but not the output
    (``"step"``: the padding's floor is added, whose gradient is zero)."""

    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.how = how

    def forward(self, hidden_states, timestep, mask, return_dict=False):
        h = hidden_states + timestep[:, None, None]
        for block in self.blocks:
            h = block(h)
        m = mask[..., None].float()
        hides = (mask.float().mean(1) < 0.5)[:, None, None] if self.how == "some" else torch.ones_like(m).bool()
        out = torch.where(hides, h * m, h)
        if self.how == "step":
            out = out + (1 - m) * torch.floor(h)
        return (out.sum(1),)


class TwoMasks(Masked):
    """``Masked("always")`` hiding by a second mask; the first one's only zeros mask a sample's every token."""

    def forward(self, hidden_states, timestep, mask_a, mask_b, return_dict=False):
        return super().forward(hidden_states, timestep, mask_b)


def test_a_mask_that_pads_nothing_does_not_shadow_one_that_does():
    """A mask whose only zeros are one sample's every token leaves out nothing (that sample attends to all alike),
    and holds in every pair trivially: the rule is the mask that pads."""
    x, t = torch.randn(2, 6, 4), torch.tensor([1.0, 2.0])
    mask_a = torch.tensor([[1] * 6, [0] * 6])
    mask_b = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    runner = GenericRunner(TwoMasks("always"))
    state = runner.inputs(hidden_states=x, timestep=t, mask_a=mask_a, mask_b=mask_b)
    runner.check(state)
    assert torch.equal(runner.real_rows("blocks.1", state), mask_b.bool())


@pytest.mark.parametrize("how", ["always", "some", "step"])
def test_padding_is_traced_on_every_sample_and_held(how):
    """Rows under the mask's zeros are left out only where every sample's gradient is zero there (a model that
    hides the padding only in some samples keeps it in), and where the output stays bit for bit the same with them
    set to random values (a zero gradient is not enough: a step function; a warning says so)."""
    x, t = torch.randn(3, 6, 4), torch.tensor([1.0, 2.0, 3.0])
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    runner = GenericRunner(Masked(how))
    state = runner.inputs(hidden_states=x, timestep=t, mask=mask)
    if how == "step":
        with pytest.warns(UserWarning, match="padded rows stay in the calibration statistics.*moves the output"):
            runner.check(state)
    else:
        runner.check(state)
    if how == "always":
        assert torch.equal(runner.real_rows("blocks.1", state), mask.bool())
    else:
        assert not runner.pads_rows and runner.real_rows("blocks.1", state) is None


def test_padding_follows_every_sample_not_one():
    """HunyuanVideo reads its prompt mask's count, not where the zeros are: a sample masking tokens in the middle
    has its trailing rows as the padding, so the rows under the mask's zeros are not silent there and no rule
    holds for the text layers (it would leave out real rows of that sample); a sample whose prompt is all masked
    (NaN in HunyuanVideo's masked mean) is checked as the model computes it."""
    model, runner, state = padded_hunyuan()
    assert runner.real_rows("transformer_blocks.0.attn.add_k_proj", state) is not None
    i = runner.input_names.index("encoder_attention_mask")
    odd = list(state)
    odd[i] = torch.stack([state[i][0], state[i][0].roll(-3)])   # (the zeros in the middle)
    runner.check(tuple(odd))
    assert runner.real_rows("transformer_blocks.0.attn.add_k_proj", tuple(odd)) is None
    none = list(state)
    none[i] = torch.stack([state[i][0], torch.zeros_like(state[i][1])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.check(tuple(none))   # (NaN out of the last sample: as the model computes it, no refusal)
    assert runner.real_rows("transformer_blocks.0.attn.add_k_proj", tuple(none)) is not None


@pytest.mark.parametrize("name,lam", [("HunyuanVideo", 0.5), ("Lumina2", 1.0), ("ErnieImage", 1.0)])
def test_evaluate_matches_brute_force(name, lam):
    """(ERNIE-Image runs sequence-first: grouped candidates split its linears' inputs on their samples' dim; off
    diffusers' zero initialisations, or its output does not move.)"""
    model, kw = zoo(name, seed=3)
    if name == "ErnieImage":
        perturbed(model)
    traced(model, kw)
    check_evaluator(model, kw, lam, seed=5, batch=len(kw["hidden_states"]))


def test_inputs_shared_constants_and_the_calibration_file(tmp_path):
    """Position ids the pipeline passes unbatched are shared (stored per sample, passed once); None and numbers are
    constants every call repeats; the spec travels in the calibration file, and a fresh runner reads it back."""
    model, kw = zoo("OvisImage")
    runner = make_runner(model)
    kw = {**kw, "joint_attention_kwargs": None}
    state = runner.inputs(**kw)
    names = runner.input_names
    assert state[names.index("img_ids")].shape[0] == kw["hidden_states"].shape[0]   # (16, 3) -> (N, 16, 3)
    runner.check(state)
    path = str(tmp_path / "c.safetensors")
    save_inputs(path, runner, state)
    fresh = GenericRunner(type(model).from_config(model.config).eval())
    fresh.model.load_state_dict(model.state_dict())
    loaded = load_inputs(path, fresh)
    assert fresh.input_names == names and all(torch.equal(a, b) for a, b in zip(loaded, state))
    with torch.no_grad():
        assert torch.equal(run_segments(fresh, loaded), model(**kw, return_dict=False)[0])
    with pytest.raises(ValueError, match="calls of OvisImageTransformer2DModel differ in their arguments"):
        runner.inputs(**{k: v for k, v in kw.items() if k != "joint_attention_kwargs"})   # (one argument fewer)
    with pytest.raises(ValueError, match="takes no"):
        runner.inputs(**kw, guidance=torch.ones(1))
    with pytest.raises(ValueError, match="takes no keyword-argument mappings"):
        runner.inputs(**{**kw, "joint_attention_kwargs": {"scale": 1.0}})
    assert "img_ids" in runner.exact_inputs and "hidden_states" not in runner.exact_inputs   # (kept as captured)
    odd = [torch.cat([t, t]) for t in loaded]   # (two samples of one call)
    i = names.index("img_ids")
    odd[i] = torch.cat([odd[i][:1], odd[i][:1] + 1])
    with pytest.raises(ValueError, match="img_ids is shared by a call's samples, but differs"):
        fresh.check_stored(tuple(odd))


def test_what_the_generic_cut_cannot_take_is_refused(tmp_path):
    """A diffusers model without a timestep argument (an autoencoder) is named; a calibration file of another class
    is refused."""
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4, sample_size=8)
    with pytest.raises(ValueError, match="and other diffusers transformers with block lists and a timestep argument; "
                                         "got AutoencoderKL"):
        make_runner(vae)
    with pytest.raises(TypeError, match="got Linear"):
        make_runner(torch.nn.Linear(2, 2))
    model, kw = zoo("CogVideoX")
    runner, state = traced(model, kw)
    path = str(tmp_path / "c.safetensors")
    save_inputs(path, runner, state)
    with pytest.raises(ValueError, match="inputs of a 'generic:CogVideoXTransformer3DModel' transformer"):
        load_inputs(path, make_runner(zoo("Mochi")[0]))


def test_search_ptq_peft_quantize(tmp_path, capsys):
    """`treeq search / ptq / peft / quantize --diffusers` on a HunyuanVideo transformer directory with saved inputs
    (two prompts padded): the artifact computes what the calibrated, fine-tuned fake-quant transformer computes; ptq
    says it leaves the padding out."""

    model, kw = zoo("HunyuanVideo")
    d = tmp_path / "hv"
    model.save_pretrained(d)
    runner = make_runner(model)
    calls = [runner.inputs(**zoo("HunyuanVideo", seed=s)[1]) for s in (1, 2, 3, 4)]
    for call, pad in zip(calls[:2], (3, 5)):
        call[runner.input_names.index("encoder_attention_mask")][:, -pad:] = 0
    calib = str(tmp_path / "calib.safetensors")
    save_inputs(calib, runner, tuple(torch.cat(ts) for ts in zip(*calls)))
    src = ["--diffusers", str(d), "--calib-inputs", calib]
    plan = searched_beats_uniform(tmp_path, src)
    assert plan.layers["single_transformer_blocks.0.attn.to_q"] == plan.layers["single_transformer_blocks.0.attn.to_v"]
    capsys.readouterr()
    direct, loaded = ptq_peft_packed(tmp_path, src, d, ptq=["--branch-params", "4"])
    assert "stays out of the statistics of 18 linears" in capsys.readouterr().out
    with torch.no_grad():
        want, got = direct(**kw).sample, loaded(**kw).sample.float()
    assert float((got - want).norm() / want.norm()) < 2e-2   # the artifact runs bf16 (quantize's default)


def tiny_auraflow_pipeline():
    """An AuraFlow pipeline built offline: a one-layer UMT5 encoder over a word-level tokenizer, the zoo's AuraFlow
    transformer, a one-level AutoencoderKL (2x), a flow-matching scheduler (random weights)."""
    transformers = pytest.importorskip("transformers", reason="AuraFlow's pipeline needs transformers (UMT5)")
    from tiny_diffusers import _word_tokenizer

    tokenizer, vocab = _word_tokenizer()
    torch.manual_seed(0)
    umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=32,
                                                                 num_layers=1, num_heads=2)).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    return diffusers.AuraFlowPipeline(tokenizer=tokenizer, text_encoder=umt5, vae=vae, transformer=zoo("AuraFlow")[0],
                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def test_capture_search_pack_and_sample_a_pipeline(tmp_path, capsys):
    """`treeq capture` on an AuraFlow pipeline (CFG: both calls recorded; timesteps taken from the calls) -> `treeq
    search` (one-step, and closed loop through the pipeline) -> `treeq quantize` -> `treeq sample`."""
    from pipeline_flow import captured, searched_and_packed

    from treeq_engine.cli import main

    size = ["--height", "16", "--width", "16"]
    pipe_dir, prompts, calib, inputs = captured(tmp_path, tiny_auraflow_pipeline(), "aura",
                                                ["--steps", "3", "--timesteps", "2", "--cfg", "3.0", *size])
    assert "kept 8 samples at 2 timesteps" in capsys.readouterr().out   # 2 prompts x 2 steps x (cond, uncond)
    assert inputs[0].shape == (8, 4, 8, 8)
    art = searched_and_packed(tmp_path, pipe_dir, calib)
    closed = tmp_path / "closed"   # (closed loop through the pipeline, on the generic cut's transformer)
    assert main(["search", "--diffusers", str(pipe_dir), "--calib-inputs", calib, "--budget", "W4A8", "--keep", "2",
                 "--baselines", "", "--select", "closed-loop-root", "--closed-loop-prompts", str(prompts),
                 "--closed-loop-steps", "2", "--closed-loop-height", "16", "--closed-loop-width", "16", "--no-progress",
                 "--device", "cpu", "--out", str(closed)]) == 0
    assert json.loads((closed / "report.json").read_text())["tss"]["closed_loop_mse"] > 0
    assert main(["sample", "--pipeline", str(pipe_dir), "--artifact", str(art), "--prompts", str(prompts), "--steps",
                 "2", *size, "--device", "cpu", "--out", str(tmp_path / "q.png")]) == 0
    refused("--frames is for a text-to-video pipeline", ["capture", "--pipeline", str(pipe_dir), "--prompts",
                                                         str(prompts), "--frames", "5", "--out", calib])


@pytest.mark.parametrize("name", ["HunyuanVideo", "Lumina2", "HunyuanVideo15"])
def test_a_weightless_profile_prices_the_rows_the_model_runs(name, tmp_path, monkeypatch):
    """`treeq profile --diffusers` prices the layers on a meta-device copy where the generic cut's trace runs there
    (HunyuanVideo); a forward that reads its inputs' values (Lumina2's mask lengths, HunyuanVideo 1.5's image test),
    which meta tensors do not hold, runs on zero weights instead. Either way the rows are those the model runs."""
    from treeq_engine.runtime import profile
    from treeq_engine.search import SearchSpace

    model, kw = zoo(name)
    runner, state = traced(model, kw)
    model.save_pretrained(tmp_path / "m")
    calib = str(tmp_path / "c.safetensors")
    save_inputs(calib, runner, state)
    zeroed, original = [], profile._zeroed
    monkeypatch.setattr(profile, "_zeroed", lambda m: zeroed.append(1) or original(m))
    rows = profile.diffusers_rows(str(tmp_path / "m"), calib, [1, 2])
    assert bool(zeroed) == (name != "HunyuanVideo")
    one = tuple(t[:1] for t in state)
    space = SearchSpace.build(model, one, forward=lambda *xs: run_segments(runner, xs), fixed_config=None)
    want = {(p.k, p.n, p.tokens) for leaf in space.leaves for p in leaf.parts} | \
        {(leaf.k, leaf.n, leaf.tokens) for leaf, _ in space.fixed}
    assert rows == sorted({(k, n, r * b) for k, n, r in want for b in (1, 2)})
