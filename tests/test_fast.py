"""fast.py: compiled denoisers with their adapters equal the eager ones, with no graph break; channels_last
changes nothing but the layout; the CLIs' flags reach the model; CUDA graphs are a noted no-op on a CPU.

Compiling is slow on a CPU, so one test compiles with inductor (the real code generation); the others
trace with dynamo and AOTAutograd (backend "aot_eager": the graphs, their backward and checkpointing,
without generated kernels).
"""

import json

import pytest
import torch

import adapters
import dit
import fast
import train_agd
import unet
from util import max_rel_err


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces anew: dynamo's caches and counters are the process's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_dit():
    torch.manual_seed(0)
    model = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                                  num_classes=5)).eval()
    for p in model.parameters():  # random everywhere: the zero-inits would hide the blocks
        p.data.normal_(0, 0.2)
    return model


def tiny_unet():
    """SDXL's features, small: a level without attention, one with 2 transformer layers, the text_time embedding."""
    torch.manual_seed(0)
    return unet.UNet(unet.UNetConfig(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=8,
        layers_per_block=1, transformer_layers_per_block=(1, 2), cross_attention_dim=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16)).eval()


def randomize(student):
    with torch.no_grad():
        for p in student.adapters.parameters():
            p.normal_(0, 0.3)
    return student


def dit_case():
    """A DiT, a student with every kind of adapter (timestep, class, modulation), inputs."""
    model = tiny_dit()
    student = randomize(adapters.attach(model, hidden_dim=16, num_heads=2, use_timestep=True, num_classes=6,
                                        modulation=True))
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 2, 8, 8, generator=g), torch.tensor([3, 400, 999]), torch.tensor([0, 4, 5])
    return model, student, x, t, {"y": y}


def unet_case():
    """An SDXL-like UNet, a student conditioned on the prompt too, inputs."""
    model = tiny_unet()
    student = randomize(adapters.attach(model, hidden_dim=16, num_heads=2, use_timestep=True, prompt_dim=32))
    g = torch.Generator().manual_seed(1)
    cond = dict(context=torch.randn(2, 77, 32, generator=g), text_embeds=torch.randn(2, 16, generator=g),
                time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    return model, student, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), cond


@pytest.mark.parametrize("case", [dit_case, unet_case])
@pytest.mark.parametrize("training", [False, True], ids=["sampling", "training"])
def test_the_adapters_hooks_cause_no_graph_break(case, training):
    """Base alone and student in its scope: one graph each; training: gradients and checkpointing, under autocast."""
    model, student, x, t, cond = case()
    model.gradient_checkpointing = training
    w = torch.tensor([1.5, 3.0, 5.0][:len(x)])
    with torch.set_grad_enabled(training), torch.autocast("cpu", torch.bfloat16, enabled=training):
        assert fast.graph_breaks(model, x, t, **cond)[:2] == (1, 0)
        with student.condition(w=w, t=t, **cond):
            graphs, breaks, reasons = fast.graph_breaks(model, x, t, **cond)
    assert (graphs, breaks) == (1, 0), reasons


@pytest.mark.slow  # inductor's kernels compiled by a C++ compiler: a minute on 2 busy cores, cold
def test_compiled_student_equals_eager_and_a_new_w_does_not_recompile():
    """inductor on the CPU: the student compiled with its adapters gives the eager output to 1e-5, at two w."""
    from torch._dynamo.utils import counters

    model, student, x, t, cond = dit_case()
    with torch.no_grad():
        eager = {w: student(x, t, w=w, **cond) for w in (2.0, 5.0)}
        fast.speed_up(model, compile=True)
        compiled = {w: student(x, t, w=w, **cond) for w in (2.0, 5.0)}
    assert model._compiled_call_impl is not None  # Module.compile: in place
    for w in eager:
        assert max_rel_err(compiled[w], eager[w]) < 1e-5, w
    assert max_rel_err(eager[2.0], eager[5.0]) > 1e-2  # w matters: the equality above is not trivial
    assert counters["stats"]["unique_graphs"] == 1  # w is an input of the graph, not a constant


def test_compiled_training_gives_the_eager_adapters(tmp_path):
    """train_agd.train with the base compiled (dynamo + AOTAutograd), checkpointing on: the same adapters to 1e-5."""
    g = torch.Generator().manual_seed(2)
    rows = {"x": torch.randn(8, 2, 8, 8, generator=g).half(), "t": torch.randint(0, 1000, (8,), generator=g),
            "target": torch.randn(8, 4, 8, 8, generator=g).half(), "w": 1 + 5 * torch.rand(8, generator=g),
            "traj": torch.arange(8), "cond.y": torch.randint(0, 6, (8,), generator=g)}
    trained = []
    for compiled in (False, True):
        model, student, *_ = dit_case()
        model.gradient_checkpointing = True
        fast.speed_up(model, compile=compiled, backend="aot_eager")
        hp = train_agd.Training(train_steps=3, batch_size=4, lr=1e-2, save_every=100)
        (tmp_path / str(compiled)).mkdir()
        train_agd.train(student, lambda step: rows, hp, tmp_path / str(compiled))
        trained.append(student.adapter_state_dict())
    assert trained[0].keys() == trained[1].keys()
    for k in trained[0]:
        assert max_rel_err(trained[1][k], trained[0][k]) < 1e-5, k
    assert json.loads((tmp_path / "True" / "losses.json").read_text()) == \
        pytest.approx(json.loads((tmp_path / "False" / "losses.json").read_text()), rel=1e-5)


def test_channels_last_changes_the_layout_not_the_output():
    model, student, x, t, cond = unet_case()
    with torch.no_grad():
        before = (model(x, t, **cond), student(x, t, w=4.0, **cond))
        fast.speed_up(model, channels_last=True)
        after = (model(x, t, **cond), student(x, t, w=4.0, **cond))
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(after, before):
        assert max_rel_err(a, b) < 1e-5


def test_channels_last_is_for_the_unet_and_cuda_graphs_for_cuda():
    notes = []
    model = tiny_dit()
    fast.speed_up(model, cuda_graphs=True, channels_last=True, log=notes.append)
    assert len(notes) == 2 and "--channels-last" in notes[0] and "--cuda-graphs" in notes[1]
    assert model._compiled_call_impl is None  # nothing compiled: on a CPU the flag is a no-op
    assert model.x_embedder.proj.weight.is_contiguous()
    assert fast.compile_options("cuda", cuda_graphs=True) == ({"mode": "reduce-overhead"}, None)
    assert fast.compile_options("cuda:1") == ({}, None)
    assert fast.compile_options("cpu", cuda_graphs=True)[0] == {}


@pytest.fixture
def compile_calls(monkeypatch):
    """Module.compile, recorded, and traced with aot_eager (the CLIs' inductor takes minutes on a CPU)."""
    calls, real = [], torch.nn.Module.compile

    def recording(self, **options):
        calls.append((type(self).__name__, options))
        real(self, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", recording)
    return calls


def test_sample_compile_gives_the_eager_images(compile_calls, capsys):
    import sample

    argv = ["--model", "tiny", "--classes", "0", "7", "--steps", "3", "--device", "cpu"]
    family = sample.families.FAMILIES["tiny"]
    eager = sample.generate(sample.parse_args(argv), family)[0]
    noted = sample.generate(sample.parse_args([*argv, "--cuda-graphs"]), family)[0]  # a CPU: noted, no effect
    assert "--cuda-graphs" in capsys.readouterr().out and not compile_calls
    compiled = sample.generate(sample.parse_args([*argv, "--compile"]), family)[0]
    assert compile_calls == [("DiT", {"backend": "inductor"})]
    assert torch.equal(noted, eager) and max_rel_err(compiled, eager) < 1e-5


def test_train_agd_compile_trains_the_eager_adapters(compile_calls, tmp_path):
    toy = ["--trajectories", "8", "--steps", "3", "--shard-size", "8", "--train-steps", "3", "--batch-size", "4",
           "--no-eval"]
    for flags in ([], ["--compile"]):
        train_agd.main(train_agd.parse_args([*toy, "--out", str(tmp_path / str(bool(flags))), *flags]))
    assert compile_calls == [("DiT", {"backend": "inductor"})]
    a = adapters.checkpoint.read_tensors(tmp_path / "False" / "adapters.safetensors")
    b = adapters.checkpoint.read_tensors(tmp_path / "True" / "adapters.safetensors")
    assert a.keys() == b.keys() and all(max_rel_err(b[k], a[k]) < 1e-5 for k in a)
