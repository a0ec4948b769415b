"""Adapters: a fresh student is the base model, disabled adapters give it back bit for bit, files round-trip."""

from pathlib import Path

import pytest
import torch

import adapters
import checkpoint
import dit


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                                  num_classes=5)).eval()
    for p in model.parameters():  # random everywhere: the paper's zero-inits would hide the blocks
        p.data.normal_(0, 0.2)
    return model


def inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 8, 8, generator=g), torch.tensor([3, 400, 999][:n]), torch.tensor([0, 4, 5][:n])


def randomize(student):
    """Pretend the adapters were trained: every adapter weight nonzero."""
    with torch.no_grad():
        for p in student.adapters.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("options", [{}, {"arch": "additive"}, {"use_timestep": True, "num_classes": 6, "num_heads": 2},
                                     {"modulation": True, "use_timestep": True, "num_classes": 6}])
def test_fresh_student_equals_base_exactly(options):
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        base = model(x, t, y=y)
        student = adapters.attach(model, hidden_dim=16, **options)
        assert torch.equal(student(x, t, w=4.0, y=y), base)


@pytest.mark.parametrize("modulation", [False, True])
def test_disabled_adapters_give_the_base_model_bit_for_bit(modulation):
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        base = model(x, t, y=y)
        student = adapters.attach(model, hidden_dim=16, use_timestep=True, modulation=modulation)
        randomize(student)
        guided = student(x, t, w=3.0, y=y)
        assert not torch.allclose(guided, base)  # trained adapters change the output
        student.enabled = False
        assert torch.equal(student(x, t, w=3.0, y=y), base)
        student.enabled = True
        with student.disabled():  # through the student, and inside a scope: only disabled() keeps them off
            assert torch.equal(student(x, t, w=3.0, y=y), base)
            with student.condition(w=3.0, t=t, y=y):
                assert torch.equal(model(x, t, y=y), base)
        assert torch.equal(student(x, t, w=3.0, y=y), guided)  # and they are back on
        student.detach()
        assert torch.equal(student(x, t, w=3.0, y=y), base)


def test_training_touches_only_the_adapters():
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, y = inputs()
    with torch.no_grad():
        base = model(x, t, y=y)
    student = adapters.attach(model, hidden_dim=16)
    assert all(not p.requires_grad for p in model.parameters())
    opt = torch.optim.Adam(student.adapters.parameters(), lr=1e-2)
    for _ in range(3):
        loss = (student(x, t, w=torch.tensor([1.0, 2.0, 5.0]), y=y) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(p.abs().sum() > 0 for p in (a.out_proj.weight for a in student.adapters))
    with torch.no_grad():
        assert not torch.allclose(student(x, t, w=5.0, y=y), base)  # trained: the student moved
        assert torch.equal(model(x, t, y=y), base)  # the base did not


def test_adapters_follow_w():
    model = tiny_dit()
    student = adapters.attach(model, hidden_dim=16)
    randomize(student)
    x, t, y = inputs()
    with torch.no_grad():
        assert not torch.allclose(student(x, t, w=1.0, y=y), student(x, t, w=6.0, y=y))
        per_sample = student(x, t, w=torch.tensor([1.0, 6.0, 1.0]), y=y)
        assert torch.allclose(per_sample[1], student(x, t, w=6.0, y=y)[1], atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"arch": "additive", "use_timestep": True},
                                     {"modulation": True, "zero_at_w1": True, "num_classes": 6}])
def test_save_load_round_trip(tmp_path, options):
    model = tiny_dit()
    student = adapters.attach(model, hidden_dim=16, **options)
    randomize(student)
    x, t, y = inputs()
    with torch.no_grad():
        expected = student(x, t, w=2.5, y=y)
    student.save(tmp_path / "agd.safetensors")
    student.detach()
    assert adapters.read_config(tmp_path / "agd.safetensors").hidden_dim == 16
    keys = checkpoint.read_tensors(tmp_path / "agd.safetensors")
    assert all(k.startswith(tuple(student.targets)) for k in keys) and len(keys) == len(student.adapter_state_dict())
    # onto a different instance of the same architecture (a fine-tune of the base, say)
    other = tiny_dit()
    loaded = adapters.load(other, tmp_path / "agd.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x, t, w=2.5, y=y), expected)
    n_adapter, n_base = loaded.num_parameters()
    assert 0 < n_adapter and n_base == sum(p.numel() for p in other.parameters())


def test_load_rejects_a_mismatched_file(tmp_path):
    student = adapters.attach(tiny_dit(), hidden_dim=16)
    student.save(tmp_path / "agd.safetensors")
    student.detach()
    bigger = dit.DiT(dit.DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=48, depth=2, num_heads=2,
                                   num_classes=5))
    with pytest.raises(checkpoint.CheckpointError, match=r"blocks\.0\.attn\.q_proj\.weight has shape"):
        adapters.load(bigger, tmp_path / "agd.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(checkpoint.CheckpointError, match="junk.safetensors"):
        adapters.load(tiny_dit(), tmp_path / "junk.safetensors")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="hidden_size"):
        adapters.attach(tiny_dit(), hidden_size=3)
    with pytest.raises(ValueError, match="lora"):
        adapters.attach(tiny_dit(), arch="lora")
    with pytest.raises(ValueError, match="target"):
        adapters.attach(tiny_dit(), target="attn9")  # placement is the family's, not an option


def test_placement_is_every_attention_block():
    model = tiny_dit()
    student = adapters.attach(model, hidden_dim=16)
    assert student.targets == ["blocks.0.attn", "blocks.1.attn"]
    assert [(s.kind, s.in_dim, s.out_dim) for s in student.sites] == [("tokens", 32, 32)] * 2


def test_modulation_adds_an_additive_adapter_on_every_adaLN_modulation():
    model = tiny_dit()
    student = adapters.attach(model, hidden_dim=16, modulation=True)
    assert student.targets == ["blocks.0.attn", "blocks.1.attn", "blocks.0.adaLN_modulation",
                               "blocks.1.adaLN_modulation", "final_layer.adaLN_modulation"]
    kinds = [type(a).__name__ for a in student.adapters]
    assert kinds == ["CrossAttentionAdapter"] * 2 + ["AdditiveAdapter"] * 3
    widths = [a.out_proj.out_features for a in student.adapters]
    assert widths == [32, 32, 6 * 32, 6 * 32, 2 * 32]  # shift / scale / gate of attention and MLP; the final layer's
    x, t, y = inputs()
    randomize(student)
    with torch.no_grad():  # the modulation adapters alone move the output
        with_modulation = student(x, t, w=3.0, y=y)
        for a in student.adapters[:2]:
            a.out_proj.weight.zero_(), a.out_proj.bias.zero_()
        assert not torch.allclose(student(x, t, w=3.0, y=y), model(x, t, y=y))
        assert not torch.allclose(student(x, t, w=3.0, y=y), with_modulation)
    with pytest.raises(ValueError, match="no adapter placement is declared for Sequential"):
        adapters.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), modulation=True)


def test_zero_at_w1_gives_the_conditional_model_at_w1():
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        base = model(x, t, y=y)
        student = adapters.attach(model, hidden_dim=16, zero_at_w1=True, modulation=True)
        randomize(student)
        assert torch.equal(student(x, t, w=1.0, y=y), base)  # (w - 1) = 0: no correction at all
        assert not torch.allclose(student(x, t, w=2.0, y=y), base)


def test_one_condition_token_takes_the_short_path_with_the_same_result():
    """With w alone, softmax over one key is 1: the adapter skips the attention, and gives what it would."""
    torch.manual_seed(0)
    adapter = adapters.CrossAttentionAdapter(32, 32, adapters.AdapterConfig(hidden_dim=16, num_heads=2))
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, w = torch.randn(3, 10, 32), torch.tensor([1.5, 3.0, 5.0])
    c = adapter.condition(w=w)[0] + adapters.token_positions(1, 16)
    heads = lambda z: z.view(3, -1, 2, 8).transpose(1, 2)  # noqa: E731
    attention = torch.nn.functional.scaled_dot_product_attention(
        heads(adapter.q_proj(x)), heads(adapter.k_proj(c)), heads(adapter.v_proj(c)))
    expected = adapter.out_proj(attention.transpose(1, 2).reshape(3, 10, 16))
    out = adapter(x, w=w)
    assert out.shape == (3, 1, 32)
    torch.testing.assert_close(out.expand(3, 10, 32), expected, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients():
    x, t, y = inputs()
    grads = []
    for flag in (False, True):
        model = tiny_dit()
        model.gradient_checkpointing = flag
        torch.manual_seed(0)
        student = adapters.attach(model, hidden_dim=16, use_timestep=True, modulation=True)
        randomize(student)
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        w = torch.tensor([1.5, 3.0, 5.0])
        with student.condition(w=w, t=t, y=y):  # backward inside the scope: the re-run blocks see it
            model(x, t, y=y).pow(2).mean().backward()
        assert len(calls) == (2 if flag else 1)  # checkpointed: the block ran again in backward
        grads.append([p.grad for p in student.adapters.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_bf16_student_runs_in_bf16():
    """For inference the adapters may share the base's dtype; the Fourier phases stay fp32 inside."""
    model = tiny_dit().to(torch.bfloat16)
    student = adapters.attach(model, hidden_dim=16, use_timestep=True, num_classes=6, modulation=True)
    randomize(student)
    student = student.to(dtype=torch.bfloat16)
    x, t, y = inputs()
    with torch.no_grad():
        out = student(x.to(torch.bfloat16), t, w=3.0, y=y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# -----------------------------------------------------------------------------
# no hidden state: the condition lives in an explicit scope


def test_after_a_student_call_with_gradients_the_base_is_the_base():
    model = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        base = model(x, t, y=y)
    student = adapters.attach(model, hidden_dim=16, use_timestep=True, num_classes=6, modulation=True)
    randomize(student)
    out = student(x, t, w=4.0, y=y)  # gradients on, the same batch size: nothing may linger after it
    assert out.requires_grad and not torch.allclose(out.detach(), base)
    assert torch.equal(model(x, t, y=y).detach(), base)
    out.sum().backward()  # no checkpointing: the graph holds what backward needs
    assert student.adapters[0].out_proj.weight.grad is not None


def test_a_scope_conditions_the_base_and_nests():
    model = tiny_dit()
    x, t, y = inputs()
    student = adapters.attach(model, hidden_dim=16)
    randomize(student)
    with torch.no_grad():
        base = model(x, t, y=y)
        at = {w: student(x, t, w=w, y=y) for w in (2.0, 5.0)}
        with student.condition(w=2.0, t=t, y=y):
            assert torch.equal(model(x, t, y=y), at[2.0])
            with student.condition(w=5.0, t=t, y=y):
                assert torch.equal(model(x, t, y=y), at[5.0])
            assert torch.equal(model(x, t, y=y), at[2.0])
            with pytest.raises(RuntimeError, match="holds a batch of 3 but blocks.0.attn runs a batch of 6"):
                model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, y]))  # CFG's batch: not the student's
        assert torch.equal(model(x, t, y=y), base)


def test_a_teacher_and_a_student_share_one_base_in_one_graph():
    """Step distillation's arrangement: the base alone (the teacher) and with adapters (the student)."""
    model = tiny_dit()
    x, t, y = inputs()
    student = adapters.attach(model, hidden_dim=16, use_timestep=True, modulation=True)
    randomize(student)
    w = torch.tensor([1.5, 3.0, 5.0])
    teacher_alone, student_alone = model(x, t, y=y).detach(), student(x, t, w=w, y=y).detach()
    alone = torch.autograd.grad((student(x, t, w=w, y=y) - teacher_alone).pow(2).sum(), list(student.adapters.parameters()))
    teacher = model(x, t, y=y)  # in the same graph as the student's pass, before and after it
    s = student(x, t, w=w, y=y)
    teacher_after = model(x, t, y=y)
    assert torch.equal(teacher, teacher_alone) and torch.equal(teacher_after, teacher_alone)
    assert torch.equal(s, student_alone)
    together = torch.autograd.grad((s - teacher).pow(2).sum(), list(student.adapters.parameters()))
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b)


def test_two_students_on_one_base_act_each_in_its_own_scope():
    model = tiny_dit()
    x, t, y = inputs()
    first = adapters.attach(model, hidden_dim=16)
    second = adapters.attach(model, hidden_dim=8, arch="additive")
    randomize(first), randomize(second)
    with torch.no_grad():
        base = model(x, t, y=y)
        only_first = first(x, t, w=3.0, y=y)
        only_second = second(x, t, w=3.0, y=y)
        assert not torch.allclose(only_first, only_second)
        both = adapters.call_with(model, first, second)(x, t, w=3.0, y=y)
        assert not torch.allclose(both, only_first) and not torch.allclose(both, only_second)
        assert torch.equal(model(x, t, y=y), base)


def test_backward_outside_the_scope_with_checkpointing_fails_loudly():
    """The one-call form runs its scope for the forward only: a re-run block could not see it, and torch says so."""
    model = tiny_dit()
    model.gradient_checkpointing = True
    x, t, y = inputs()
    student = adapters.attach(model, hidden_dim=16)
    randomize(student)
    out = student(x, t, w=3.0, y=y)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        out.sum().backward()


def test_a_site_the_model_lacks_is_named():
    with pytest.raises(ValueError, match="DiT has no module 'blocks.7.attn'"):
        adapters.attach(tiny_dit(), sites=[adapters.Site("blocks.7.attn", "tokens", 32, 32)])


def test_files_saved_before_the_explicit_placement_still_load():
    """tests/fixtures/adapters_format1.safetensors was saved by the adapters of before this design (with
    its `target` option), with the output it gave."""
    model = tiny_dit()
    file = Path(__file__).parent / "fixtures" / "adapters_format1.safetensors"
    student = adapters.load(model, file)
    x, t, y = inputs()
    with torch.no_grad():
        out = student(x, t, w=torch.tensor([1.5, 3.0, 5.0]), y=y)
    expected = checkpoint.read_tensors(file.with_name("adapters_format1_output.safetensors"))["out"]
    assert torch.equal(out, expected)
    assert not torch.allclose(out, model(x, t, y=y))  # the file's adapters do act
