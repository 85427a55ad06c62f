"""topk_distill.integrations.trl against the real trl 1.16.0 (installed by `make setup`).

TRL's own loss functions and ours get the same inputs - losses and gradients (w.r.t. the logits,
or the hidden states, the LM-head weight and bias) agree to fp32 rounding for beta in {0, 0.5,
1}, tail bucket on / off, temperature != 1, a plain and a softcapped Gemma-style head, padding
and fully masked sequences. Then one compute_loss of each trainer, on a tiny transformers model
built from a config (no download) with a stubbed teacher client, patched and unpatched."""
import itertools
import os
import types
from collections import defaultdict

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest
import torch
import torch.nn.functional as F

import transformers
import trl
from trl.experimental.async_distillation import async_distillation_trainer as trl_async
from trl.experimental.server_distillation import server_distillation_trainer as trl_server

from topk_distill.integrations import trl as td_trl

from _inputs import assert_close

F32 = torch.float32


def test_the_pinned_trl_is_installed():
    assert trl.__version__ == "1.16.0"


# ----------------------------------------------------------------------------- server losses

B, T, V = 3, 7, 64


def server_batch(k, seed=0):
    """Student logits [B, T, V]; the server's teacher_result (top-k sorted, -inf padded at
    positions past a sequence's end, actual-token log-probs); completion tokens; labels with
    padding at the end of row 1 and row 2 fully masked."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2.0
    t_logp = torch.log_softmax(0.7 * logits + torch.randn(B, T, V, generator=g) * 1.5, -1)
    top_lp, top_ids = t_logp.topk(k, -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, :3] = top_ids[0, :3, 0]  # the actual token is the teacher's top-1: counted once
    labels = tokens.clone()
    labels[1, 5:] = -100
    labels[2, :] = -100
    actual = t_logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    pad = labels == -100
    top_lp = torch.where(pad.unsqueeze(-1), float("-inf"), top_lp)
    top_ids = torch.where(pad.unsqueeze(-1), 0, top_ids)
    if k > 2:  # a short top-k row, padded with -inf as the server does
        top_lp[0, 4, -2:] = float("-inf")
        top_ids[0, 4, -2:] = 0
    actual = torch.where(pad, float("-inf"), actual)
    result = dict(topk_logprobs=top_lp, topk_token_ids=top_ids, actual_logprobs=actual)
    return logits, result, tokens, labels


def server_trainer(beta, add_tail, temperature, k=1, model=None, client=None):
    """A ServerDistillationTrainer without __init__ (which connects to a vLLM server): the
    attributes its compute_loss and loss methods read."""
    tr = trl_server.ServerDistillationTrainer.__new__(trl_server.ServerDistillationTrainer)
    tr.beta, tr.temperature, tr.loss_add_tail = beta, temperature, add_tail
    tr.loss_top_k, tr.reverse_kl_top_1_mode = k, "sampled"
    tr.current_gradient_accumulation_steps = 3
    if model is not None:
        # nn.Module-free attributes set through object's setattr (Trainer is not a Module).
        tr.model, tr.teacher_client = model, client
    return tr


def trl_server_loss(tr, logits, result, tokens, labels):
    lp = F.log_softmax(logits / tr.temperature, dim=-1)
    if tr.beta > 0:
        return tr._compute_server_sparse_top_1_divergence_loss(
            teacher_result=result, student_log_probs=lp, completion_tokens=tokens, labels=labels)
    return tr._compute_server_forward_kl_loss(teacher_result=result, student_log_probs=lp,
                                              labels=labels)


SERVER_CASES = list(itertools.product([0.0, 0.5, 1.0], [True, False], [1.0, 0.7]))


@pytest.mark.parametrize("beta,add_tail,temperature", SERVER_CASES)
def test_server_losses_match_trl(beta, add_tail, temperature):
    k = 8 if beta == 0 else 1  # TRL: loss_top_k must be 1 with beta > 0
    logits, result, tokens, labels = server_batch(k, seed=int(beta * 10) + add_tail)
    tr = server_trainer(beta, add_tail, temperature, k)
    x_trl = logits.clone().requires_grad_(True)
    exp = trl_server_loss(tr, x_trl, result, tokens, labels)
    (g_exp,) = torch.autograd.grad(exp, x_trl)
    x = logits.clone().requires_grad_(True)
    got = td_trl.server_distillation_loss(tr, result, x, tokens, labels)
    (g_got,) = torch.autograd.grad(got, x)
    what = f"beta={beta} tail={add_tail} T={temperature}"
    # beta = 1 without the tail: one renormalised bin on each side, a loss of exactly 0 (TRL's
    # own definition; the drop-in agrees, docs/TRL.md).
    assert torch.isfinite(exp) and (exp == 0 if beta == 1 and not add_tail else exp > 0)
    assert_close(got, exp, F32, what + " loss")
    assert_close(g_got, g_exp, F32, what + " grad logits")
    assert bool((g_got[2] == 0).all())  # the fully masked sequence gets no gradient


def test_server_loss_on_a_sliced_view_does_not_copy_the_logits():
    """compute_loss passes logits[:, p - 1:-1][:, :T]: a strided view, used as it is."""
    logits, result, tokens, labels = server_batch(8)
    full = torch.cat([torch.zeros(B, 2, V), logits, torch.zeros(B, 1, V)], 1)
    tr = server_trainer(0.0, True, 1.0, 8)
    view = full[:, 1:-1][:, 1:1 + T]
    assert view.data_ptr() != logits.data_ptr() and not view.is_contiguous()
    assert_close(td_trl.server_distillation_loss(tr, result, view, tokens, labels),
                 trl_server_loss(tr, logits, result, tokens, labels), F32, "view")


def test_server_missing_actual_logprob_raises_trls_error():
    logits, result, tokens, labels = server_batch(1)
    result["actual_logprobs"][0, 1] = float("-inf")
    tr = server_trainer(0.5, True, 1.0)
    for fn in (lambda: trl_server_loss(tr, logits, result, tokens, labels),
               lambda: td_trl.server_distillation_loss(tr, result, logits, tokens, labels)):
        with pytest.raises(ValueError, match="missing actual-token logprobs"):
            fn()


# ----------------------------------------------------------------------------- async loss

N, H, VA, KA = 37, 24, 96, 6


def async_batch(beta, head, seed=0, teachers=1):
    """hidden [N, H], an LM head (weight, bias), and the teacher-side candidates as
    AsyncDistillationTrainer._compute_loss builds them (TRL's own _narrow_top1_actual_support
    for beta != 0), with -1 / -inf padded candidates and, for several teachers, teacher_id_idx."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(VA, H, generator=g) * (2.5 / H ** 0.5)
    bias = torch.randn(VA, generator=g) * 0.3 if head.get("bias") else None
    z = reference_logits(hidden, weight, bias, head)
    t_logp = torch.log_softmax(0.6 * z + torch.randn(N, VA, generator=g), -1)
    top_lp, top_ids = t_logp.topk(KA, -1)
    actual = torch.randint(0, VA, (N,), generator=g)
    actual[:5] = top_ids[:5, 2]  # in the teacher's top-k: has a teacher log-prob
    actual[5:8] = top_ids[5:8, 0]  # the teacher's top-1 itself: deduplicated
    top_ids[10, -2:] = -1  # a short row
    top_lp[10, -2:] = float("-inf")
    valid_wide = top_ids != -1
    if beta == 0:
        target, target_lp, valid = top_ids, top_lp, valid_wide
    else:
        target, target_lp, valid = trl_async._narrow_top1_actual_support(
            top_ids[None], top_lp[None], actual[None], valid_wide[None], beta)
        target, target_lp, valid = target[0], target_lp[0], valid[0]
        keep = valid.any(-1)  # TRL packs only the positions with teacher signal
        hidden, target, target_lp, valid = hidden[keep], target[keep], target_lp[keep], valid[keep]
    idx = None
    if teachers > 1:
        idx = torch.arange(hidden.shape[0]) % teachers
    return hidden, weight, bias, target, target_lp, valid, idx


def reference_logits(hidden, weight, bias, head):
    z = hidden @ weight.T + (0 if bias is None else bias)
    z = z * head.get("logit_scale", 1.0)
    cap = head.get("final_logit_softcapping")
    return z if cap is None else cap * torch.tanh(z / cap)


HEADS = {"plain": dict(bias=True),
         "gemma": dict(final_logit_softcapping=4.0, logit_scale=1.3)}
ASYNC_CASES = list(itertools.product([0.0, 0.5, 1.0], [True, False], ["plain", "gemma"]))


def run_chunked(fn, batch, beta, add_tail, temperature, head, teachers):
    hidden, weight, bias, target, target_lp, valid, idx = batch
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + (
        () if bias is None else (bias,))]
    b = leaves[2] if bias is not None else None
    outs = fn(leaves[0], leaves[1], b, head.get("logit_scale", 1.0),
              head.get("final_logit_softcapping"), target, target_lp, valid, beta, temperature,
              add_tail, idx, teachers, 16)
    grads = torch.autograd.grad(outs[0] * 0.37, leaves)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("beta,add_tail,head", ASYNC_CASES)
def test_chunked_jsd_loss_matches_trl(beta, add_tail, head):
    """Every one of the five results and the gradients of hidden, weight and bias; TRL's chunk
    of 16 rows (3 chunks) against our one fused call; two teachers in half the cases."""
    teachers = 2 if ASYNC_CASES.index((beta, add_tail, head)) % 2 else 1
    temperature = 0.8 if head == "gemma" else 1.25
    batch = async_batch(beta, HEADS[head], seed=ASYNC_CASES.index((beta, add_tail, head)),
                        teachers=teachers)
    kw = dict(beta=beta, add_tail=add_tail, temperature=temperature, head=HEADS[head],
              teachers=teachers)
    exp, g_exp = run_chunked(trl_async._chunked_jsd_loss, batch, **kw)
    got, g_got = run_chunked(td_trl.chunked_jsd_loss, batch, **kw)
    what = f"beta={beta} tail={add_tail} {head} teachers={teachers}"
    assert exp[0] == 0 if beta == 1 and not add_tail else exp[0] > 0  # as on the server path
    for name, a, b in zip(["loss", "jsd_sum", "entropy_sum", "teacher_entropy_sum",
                           "per_teacher_stats"], got, exp):
        assert_close(a, b, F32, f"{what} {name}")
    for name, a, b in zip(["hidden", "weight", "bias"], g_got, g_exp):
        assert_close(a, b, F32, f"{what} grad {name}")


def test_chunked_jsd_loss_bf16_model_runs_the_head_in_fp32_as_trl():
    """A bf16 LM head: TRL casts to fp32 inside; so does the drop-in (gradients reach the bf16
    leaves in bf16)."""
    batch = list(async_batch(0.0, HEADS["gemma"], seed=4))
    batch[0], batch[1] = batch[0].bfloat16(), batch[1].bfloat16()
    kw = dict(beta=0.0, add_tail=True, temperature=1.0, head=HEADS["gemma"], teachers=1)
    exp, g_exp = run_chunked(trl_async._chunked_jsd_loss, batch, **kw)
    got, g_got = run_chunked(td_trl.chunked_jsd_loss, batch, **kw)
    assert_close(got[0], exp[0], F32, "bf16 loss")
    for a, b in zip(g_got, g_exp):
        assert a.dtype == torch.bfloat16
        assert_close(a, b, torch.bfloat16, "bf16 grads")


# ----------------------------------------------------------------------------- trainers

def tiny_llama(seed=0, vocab=80):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).float()


def tiny_gemma2(seed=0, vocab=80):
    torch.manual_seed(seed)
    cfg = transformers.Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=64, final_logit_softcapping=5.0)
    cfg._attn_implementation = "eager"
    return transformers.Gemma2ForCausalLM(cfg).float()


class StubTeacherClient:
    """VLLMClient.get_sequence_logprobs from a local teacher model: per completion position the
    teacher's top-k log-probs (sorted) and ids, and the actual token's log-prob."""

    def __init__(self, teacher):
        self.teacher = teacher

    @torch.no_grad()
    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs, temperature):
        out = defaultdict(list)
        for seq, p in zip(sequences, prompt_lengths):
            ids = torch.tensor(seq)[None]
            lp = torch.log_softmax(self.teacher(input_ids=ids).logits[0] / temperature, -1)
            pos = torch.arange(p, len(seq))
            step = lp[pos - 1]
            top_v, top_i = step.topk(top_logprobs, -1)
            out["logprobs"].append(top_v.tolist())
            out["logprob_token_ids"].append(top_i.tolist())
            out["actual_logprobs"].append(step.gather(-1, ids[0, pos, None]).tolist())
        return dict(out)


def server_inputs(seed=0, vocab=80):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(1, vocab, (3, 4), generator=g)
    prompt_mask = torch.ones(3, 4, dtype=torch.long)
    prompt_mask[1, 0] = 0  # left-padded prompt
    completion_ids = torch.randint(1, vocab, (3, 6), generator=g)
    completion_mask = torch.ones(3, 6, dtype=torch.long)
    completion_mask[2, 3:] = 0  # right-padded completion
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("beta,add_tail", [(0.0, True), (0.0, False), (0.5, False), (1.0, True)])
def test_server_trainer_compute_loss_patched_and_unpatched(beta, add_tail):
    k = 5 if beta == 0 else 1
    model = tiny_llama()
    client = StubTeacherClient(tiny_llama(seed=1))
    tr = server_trainer(beta, add_tail, 0.9, k, model=model, client=client)
    model.train()
    results = []
    for patched in (False, True):
        model.zero_grad()
        if patched:
            with td_trl.patch_trl() as patch:
                assert trl_server.ServerDistillationTrainer.compute_loss is td_trl.server_compute_loss
                loss = tr.compute_loss(model, server_inputs())
            assert patch.active is False
        else:
            loss = tr.compute_loss(model, server_inputs())
        loss.backward()
        results.append((loss.detach(), grads_of(model)))
    assert trl_server.ServerDistillationTrainer.compute_loss is not td_trl.server_compute_loss
    (l0, g0), (l1, g1) = results
    assert l0 > 0
    assert_close(l1, l0, F32, "loss")
    assert g0.keys() == g1.keys() and len(g0) > 5
    for name in g0:
        assert_close(g1[name], g0[name], F32, f"grad {name}")


def async_trainer(model, beta, add_tail, temperature, teachers):
    """An AsyncDistillationTrainer without __init__ (which loads a model by name and starts a
    rollout worker): the attributes compute_loss reads, and a real CPU Accelerator."""
    import accelerate
    from trl.models.utils import _ForwardRedirection
    tr = trl_async.AsyncDistillationTrainer.__new__(trl_async.AsyncDistillationTrainer)
    tr.args = types.SimpleNamespace(beta=beta, add_tail_bucket=add_tail,
                                    teacher_temperature=temperature)
    tr.accelerator = accelerate.Accelerator(cpu=True)
    tr._forward_redirection = _ForwardRedirection()
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._teacher_ids = [f"teacher{i}" for i in range(teachers)]
    tr.current_gradient_accumulation_steps = 2
    tr._step_forward_tokens = tr._step_trained_tokens = tr._step_seq_len_weighted = 0.0
    tr._step_samples = tr._step_forward_s = 0.0
    tr.model = model
    return tr


def async_inputs(teacher, seed=0, vocab=80, k=6, teachers=1):
    """The collator's padding-free batch: two packed sequences in one row (position_ids reset),
    trailing inter-rank padding, the teacher's top-k (+ the actual token, as vLLM's
    prompt_logprobs) at every position, -1 / -inf padded."""
    g = torch.Generator().manual_seed(seed)
    lens, prompt = [9, 7], 3
    total = sum(lens)
    ids = torch.randint(1, vocab, (1, total + 2), generator=g)
    attention = torch.ones(1, total + 2, dtype=torch.long)
    attention[0, total:] = 0
    position = torch.cat([torch.arange(n) for n in lens] + [torch.zeros(2, dtype=torch.long)])[None]
    completion = torch.zeros(1, total + 2, dtype=torch.long)
    start = 0
    for n in lens:
        completion[0, start + prompt:start + n] = 1
        start += n
    t_ids = torch.full((1, total + 2, k + 1), -1)
    t_lp = torch.full((1, total + 2, k + 1), float("-inf"))
    with torch.no_grad():
        start = 0
        for n in lens:
            seq = ids[:, start:start + n]
            lp = torch.log_softmax(teacher(input_ids=seq).logits[0], -1)
            for j in range(1, n):  # entry j: the distribution of token j given tokens < j
                top_v, top_i = lp[j - 1].topk(k)
                actual = seq[0, j]
                t_ids[0, start + j, :k], t_lp[0, start + j, :k] = top_i, top_v
                if actual not in top_i:
                    t_ids[0, start + j, k], t_lp[0, start + j, k] = actual, lp[j - 1, actual]
            start += n
    t_ids[0, 5, 4:] = -1  # a short row
    t_lp[0, 5, 4:] = float("-inf")
    n_tok = float(completion[:, 1:].sum())
    batch = dict(input_ids=ids, attention_mask=attention, position_ids=position,
                 completion_mask=completion, teacher_topk_ids=t_ids, teacher_topk_logprobs=t_lp,
                 global_n_tokens=torch.tensor([n_tok]), global_n_forward_tokens=torch.tensor([total]),
                 mean_seq_len=torch.tensor([total / 2.0]))
    if teachers > 1:
        batch["teacher_id_idx"] = torch.tensor([[0] * lens[0] + [1] * lens[1] + [-1, -1]])
    return batch


@pytest.mark.parametrize("beta,add_tail,model_fn,teachers", [
    (0.0, True, tiny_gemma2, 1), (0.5, False, tiny_llama, 2), (1.0, True, tiny_gemma2, 2)])
def test_async_trainer_compute_loss_patched_and_unpatched(beta, add_tail, model_fn, teachers):
    """The loss, every parameter's gradient and every logged metric (jsd, entropy,
    teacher_entropy, per-teacher stats) agree; the Gemma2 head is softcapped."""
    model = model_fn()
    teacher = model_fn(seed=1)
    inputs = async_inputs(teacher, teachers=teachers)
    results = []
    for patched in (False, True):
        tr = async_trainer(model, beta, add_tail, 0.85, teachers)
        model.zero_grad()
        if patched:
            with td_trl.patch_trl():
                assert trl_async._chunked_jsd_loss is td_trl.chunked_jsd_loss
                loss = tr.compute_loss(model, inputs)
        else:
            loss = tr.compute_loss(model, inputs)
        loss.backward()
        results.append((loss.detach(), grads_of(model), dict(tr._metrics["train"])))
    assert trl_async._chunked_jsd_loss is not td_trl.chunked_jsd_loss
    (l0, g0, m0), (l1, g1, m1) = results
    assert l0 > 0
    assert_close(l1, l0, F32, "loss")
    assert g0.keys() == g1.keys() and len(g0) > 5
    for name in g0:
        assert_close(g1[name], g0[name], F32, f"grad {name}")
    expected_keys = {"jsd", "entropy", "teacher_entropy"}
    if teachers > 1:
        expected_keys |= {f"teacher_{s}/teacher{i}" for s in ("jsd", "entropy", "token_frac")
                          for i in range(teachers)}
    assert set(m0) == set(m1) == expected_keys
    for key in m0:
        assert_close(torch.tensor(m1[key], dtype=torch.float64),
                     torch.tensor(m0[key], dtype=torch.float64), F32, key)


def test_patch_trl_is_idempotent_and_undone():
    p1 = td_trl.patch_trl()
    try:
        assert td_trl.patch_trl() is p1 and p1.active and not p1.skipped
        assert "ServerDistillationTrainer.compute_loss" in repr(p1)
    finally:
        assert td_trl.unpatch_trl()
    assert not td_trl.unpatch_trl()
    assert trl_async._chunked_jsd_loss.__module__ == trl_async.__name__
