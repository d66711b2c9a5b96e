#!/usr/bin/env python3
"""Checks `moelab layer` against the MoE blocks of HF transformers, rebuilt here in float32 torch.

For each block (Mixtral, Qwen2-MoE, DeepSeek-V3, OLMoE, Switch-Transformers with and without
dropped tokens) the check
  1. draws a random input x [T, d], a random output gradient R [T, d] and random weights under the
     block's HF names (the layout of HF checkpoints), and writes them as safetensors files;
  2. computes the block's forward in torch, following the maths of the HF modelling code (each
     block function names the file and function it follows), and the gradients of sum(y * R)
     with respect to x and every weight by autograd;
  3. runs `moelab layer RECIPE --names FORMAT --weights W --input X --output OUT --eval --grad DY`
     with the block's recipe from tests/reference/recipes/;
  4. compares y, the router logits, the combine weights (as a dense [T, E] matrix), the chosen
     expert sets (order-insensitive), the experts that served each token after capacity, and the
     gradients (moelab names them after its own parameters; they are mapped to HF's names here).

Error measures (docs/reference-check.md):
  max relative error  = max_i |a_i - b_i| / max_i |b_i|                   (b: the torch reference)
  elementwise error   = max_i |a_i - b_i| / max(|b_i|, floor), floor = 1e-2 * max_i |b_i|
A block passes when every max relative error is below --tolerance (1e-5) and every elementwise
error below --elementwise-tolerance (1e-4), and the routing decisions agree exactly.

Exit status: 0 all blocks agree; 1 some block disagrees (the report says where); 2 usage error or
moelab failed to run; 77 torch cannot be imported (ctest's SKIP_RETURN_CODE).

Needs only the Python standard library and torch (Debian 12: apt-get install python3-torch, then
run with /usr/bin/python3). The safetensors files are read and written here with json + struct.
"""

import argparse
import json
import math
import pathlib
import struct
import subprocess
import sys
import tempfile

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR, EXIT_SKIP = 0, 1, 2, 77

try:
    import torch
    import torch.nn.functional as F
except ImportError as error:  # the ctest test turns this status into SKIPPED
    print(f"hf_moe_blocks: SKIPPED: {sys.executable} cannot import torch ({error}); "
          "install it with `apt-get install python3-torch` (or tools/setup-deps --tests) and run "
          "this script with /usr/bin/python3", file=sys.stderr)
    sys.exit(EXIT_SKIP)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------
# safetensors (https://github.com/huggingface/safetensors, README "Format"): u64 little-endian
# header length N, N bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": {..}},
# then the data buffer; offsets are relative to the buffer. Little-endian element data.

_DTYPES = {  # safetensors name -> (torch dtype, struct code, bytes per element)
    "F32": (torch.float32, "f", 4),
    "F64": (torch.float64, "d", 8),
    "I32": (torch.int32, "i", 4),
    "I64": (torch.int64, "q", 8),
}
_NAME_OF_DTYPE = {dtype: name for name, (dtype, _, _) in _DTYPES.items()}


def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: torch tensor of a dtype in _DTYPES}, written in name order."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.dtype not in _NAME_OF_DTYPE:
            raise ValueError(f"{path}: tensor '{name}' has dtype {tensor.dtype}, which this writer does not know")
        dtype_name = _NAME_OF_DTYPE[tensor.dtype]
        _, code, size = _DTYPES[dtype_name]
        values = tensor.reshape(-1).tolist()
        data = struct.pack(f"<{len(values)}{code}", *values)
        header[name] = {"dtype": dtype_name, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned, as the reference writer does
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def read_safetensors(path):
    """Returns ({name: tensor}, metadata). Raises ValueError naming the file for a malformed one."""
    blob = pathlib.Path(path).read_bytes()
    if len(blob) < 8:
        raise ValueError(f"{path}: {len(blob)} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack_from("<Q", blob, 0)
    if 8 + header_len > len(blob):
        raise ValueError(f"{path}: header of {header_len} bytes runs past the end of the file")
    header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    base = 8 + header_len
    tensors, metadata = {}, header.pop("__metadata__", {})
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has dtype {info['dtype']}, which this reader does not know")
        dtype, code, size = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = math.prod(info["shape"])
        if end - begin != count * size or base + end > len(blob):
            raise ValueError(f"{path}: tensor '{name}' has inconsistent data_offsets {info['data_offsets']}")
        values = struct.unpack_from(f"<{count}{code}", blob, base + begin)
        tensors[name] = torch.tensor(values, dtype=dtype).reshape(info["shape"])
    return tensors, metadata


# ------------------------------------------------------------------------------------------------
# The HF blocks' maths. Each function takes x [T, d] and the weights under their HF names and
# returns y [T, d] plus the routing it used: logits [T, E], chosen [T, k] (expert ids), weight
# [T, k] (their combine weights) and served [T, k] (the expert that processed each choice, -1
# when capacity dropped it). Weights are plain tensors (requires_grad for the backward check).


def swiglu_mlp(x, gate_proj, up_proj, down_proj):
    # Mixtral's MixtralBlockSparseTop2MLP.forward (w1 = gate, w3 = up, w2 = down), Qwen2MoeMLP,
    # OlmoeMLP and DeepseekV3MLP.forward: down(silu(gate x) * up x), Linear layers without bias.
    return F.linear(F.silu(F.linear(x, gate_proj)) * F.linear(x, up_proj), down_proj)


def routed_sum(x, chosen, weight, expert):
    """The per-expert loop of the HF token-choice blocks (MixtralSparseMoeBlock.forward and its
    copies): every expert runs on the tokens that chose it, its output is scaled by their combine
    weights and index_add-ed into a zero [T, d] output."""
    y = torch.zeros_like(x)
    for e in range(expert.count):
        tokens, slot = torch.where(chosen == e)
        if tokens.numel() == 0:
            continue
        y = y.index_add(0, tokens, expert(e, x[tokens]) * weight[tokens, slot, None])
    return y


class Experts:
    """Expert e's MLP over the HF names given by a pattern with {e}."""

    def __init__(self, weights, count, pieces):
        self.weights, self.count, self.pieces = weights, count, pieces

    def __call__(self, e, x):
        return swiglu_mlp(x, *(self.weights[p.format(e=e)] for p in self.pieces))


def softmax_topk_block(x, w, cfg, expert_pieces, renormalize):
    # modeling_mixtral.py MixtralSparseMoeBlock.forward (renormalize always), modeling_qwen2_moe.py
    # Qwen2MoeSparseMoeBlock.forward and modeling_olmoe.py OlmoeSparseMoeBlock.forward (renormalize
    # = config.norm_topk_prob): router_logits = gate(x); softmax over the experts in float32;
    # topk of the probabilities; optionally divided by their sum.
    logits = F.linear(x, w["gate.weight"])
    probs = F.softmax(logits, dim=1, dtype=torch.float)
    weight, chosen = torch.topk(probs, cfg["top_k"], dim=-1)
    if renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    y = routed_sum(x, chosen, weight, Experts(w, cfg["num_experts"], expert_pieces))
    return y, {"logits": logits, "chosen": chosen, "weight": weight, "served": chosen}


def mixtral(x, w, cfg):
    return softmax_topk_block(x, w, cfg, ("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight"),
                              renormalize=True)


def olmoe(x, w, cfg):
    return softmax_topk_block(x, w, cfg, GLU_PIECES, renormalize=cfg["norm_topk_prob"])


def qwen2_moe(x, w, cfg):
    y, routing = softmax_topk_block(x, w, cfg, GLU_PIECES, renormalize=cfg["norm_topk_prob"])
    # Qwen2MoeSparseMoeBlock.forward: shared_expert(x) * sigmoid(shared_expert_gate(x)), added to
    # the routed sum; shared_expert_gate is Linear(hidden_size, 1, bias=False).
    shared = swiglu_mlp(x, w["shared_expert.gate_proj.weight"], w["shared_expert.up_proj.weight"],
                        w["shared_expert.down_proj.weight"])
    return y + torch.sigmoid(F.linear(x, w["shared_expert_gate.weight"])) * shared, routing


def deepseek_v3_choice(scores, bias, cfg, masked_value):
    # modeling_deepseek_v3.py DeepseekV3TopkRouter.get_topk_indices: keys = scores + bias; a
    # group's score is the sum of its 2 best keys; the topk_group best groups stay; the others'
    # keys are masked_fill-ed with 0.0; topk of the keys. (masked_value lets the report count the
    # tokens where masking with -inf, as DeepSeek's own inference code and moelab do, would choose
    # differently.)
    experts, groups = cfg["num_experts"], cfg["n_group"]
    keys = scores.view(-1, experts) + bias.unsqueeze(0)
    group_scores = keys.view(-1, groups, experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=cfg["topk_group"], dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, groups, experts // groups).reshape(-1, experts)
    keys = keys.masked_fill(~expert_mask.bool(), masked_value)
    return torch.topk(keys, k=cfg["top_k"], dim=-1, sorted=False)[1]


def deepseek_v3(x, w, cfg):
    # modeling_deepseek_v3.py DeepseekV3TopkRouter.forward: logits = x W^T in float32, scores =
    # sigmoid(logits); choose with the bias (no gradient); weights = scores at the chosen experts,
    # divided by (their sum + 1e-20) when norm_topk_prob, times routed_scaling_factor.
    logits = F.linear(x.float(), w["gate.weight"].float())
    scores = logits.sigmoid()
    bias = w["gate.e_score_correction_bias"]
    with torch.no_grad():
        chosen = deepseek_v3_choice(scores, bias, cfg, 0.0)
    weight = scores.gather(1, chosen)
    if cfg["norm_topk_prob"]:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    weight = weight * cfg["routed_scaling_factor"]
    # DeepseekV3MoE.moe / forward: the routed loop, plus shared_experts(x), one DeepseekV3MLP of
    # width moe_intermediate_size * n_shared_experts, ungated.
    y = routed_sum(x, chosen, weight, Experts(w, cfg["num_experts"], GLU_PIECES))
    shared = swiglu_mlp(x, w["shared_experts.gate_proj.weight"], w["shared_experts.up_proj.weight"],
                        w["shared_experts.down_proj.weight"])
    with torch.no_grad():  # diagnostics: how much the bias, the group limit and the masking matter
        unbiased = deepseek_v3_choice(scores, torch.zeros_like(bias), cfg, 0.0)
        ungrouped = torch.topk(scores + bias, k=cfg["top_k"], dim=-1)[1]
        minus_inf = deepseek_v3_choice(scores, bias, cfg, float("-inf"))
    notes = {"tokens the bias re-routes": differing_rows(chosen, unbiased),
             "tokens the group limit re-routes": differing_rows(chosen, ungrouped),
             MASKING_NOTE: differing_rows(chosen, minus_inf)}
    return y + shared, {"logits": logits, "chosen": chosen, "weight": weight, "served": chosen, "notes": notes}


def switch(x, w, cfg):
    # modeling_switch_transformers.py SwitchTransformersTop1Router.forward, in evaluation mode (no
    # jitter: _compute_router_probabilities applies it only when self.training), on x viewed as
    # [batch = 1, sequence = T, d]: softmax in float32; expert = argmax; keep a token if the
    # cumulative count of tokens for its expert along the sequence (cumsum over dim -2) is at
    # most expert_capacity; router_probs = the max probability.
    experts = cfg["num_experts"]
    logits = F.linear(x, w["router.classifier.weight"]).unsqueeze(0)  # [1, T, E]
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    expert_index = F.one_hot(torch.argmax(probs, dim=-1), num_classes=experts)
    token_priority = torch.cumsum(expert_index, dim=-2)
    router_mask = (expert_index * (token_priority <= cfg["expert_capacity"])).bool()
    top_prob = torch.max(probs, dim=-1).values.unsqueeze(-1)
    # SwitchTransformersSparseMLP.forward: next_states start as zeros, so a dropped token's output
    # is 0 (since transformers PR #37123; earlier releases started from a copy of x, giving p * x);
    # each expert's tokens get SwitchTransformersDenseActDense: wo(relu(wi x)), dropout off in
    # evaluation; y = router_probs * next_states.
    hidden = x.unsqueeze(0)
    next_states = torch.zeros_like(hidden)
    for e in range(experts):
        mask = router_mask[:, :, e]
        if mask.any():
            h = F.relu(F.linear(hidden[mask], w[f"experts.expert_{e}.wi.weight"]))
            next_states[mask] = F.linear(h, w[f"experts.expert_{e}.wo.weight"])
    y = (top_prob * next_states).squeeze(0)
    chosen = torch.argmax(probs, dim=-1).squeeze(0).unsqueeze(-1)  # [T, 1]: the router's choice
    kept = router_mask.any(dim=-1).squeeze(0).unsqueeze(-1)
    served = torch.where(kept, chosen, torch.full_like(chosen, -1))
    notes = {"tokens dropped by capacity": int((~kept).sum())}
    return y, {"logits": logits.squeeze(0), "chosen": chosen, "weight": top_prob.squeeze(0), "served": served,
               "notes": notes}


MASKING_NOTE = "tokens where -inf group masking differs"
GLU_PIECES = ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight")


def differing_rows(a, b):
    return sum(set(r) != set(s) for r, s in zip(a.tolist(), b.tolist()))


# ------------------------------------------------------------------------------------------------
# The blocks: HF config, weight shapes under HF names, and where each moelab parameter lives in
# them (rows of HF tensors stacked, per expert when "{e}" appears) — written from the HF modelling
# code independently of framework/src/formats/weight_names.cpp, so the check covers that mapping too.

TOKENS, D_MODEL = 64, 32


def glu_layout(prefix_routed, shared=None):
    layout = {"router.weight": ["gate.weight"],
              "experts.w_in": [f"{prefix_routed}.gate_proj.weight", f"{prefix_routed}.up_proj.weight"],
              "experts.w_out": [f"{prefix_routed}.down_proj.weight"]}
    if shared:
        layout["experts.shared.w_in"] = [f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"]
        layout["experts.shared.w_out"] = [f"{shared}.down_proj.weight"]
    return layout


def glu_shapes(width, prefix="experts.{e}"):
    d = D_MODEL
    return {f"{prefix}.gate_proj.weight": [width, d], f"{prefix}.up_proj.weight": [width, d],
            f"{prefix}.down_proj.weight": [d, width]}


BLOCKS = {
    "mixtral": {
        "hf": "modeling_mixtral.py MixtralSparseMoeBlock",
        "forward": mixtral,
        "names": "mixtral",
        "cfg": {"num_experts": 8, "top_k": 2, "intermediate_size": 48},
        "shapes": lambda c: {"gate.weight": [c["num_experts"], D_MODEL],
                             "experts.{e}.w1.weight": [c["intermediate_size"], D_MODEL],
                             "experts.{e}.w3.weight": [c["intermediate_size"], D_MODEL],
                             "experts.{e}.w2.weight": [D_MODEL, c["intermediate_size"]]},
        "layout": {"router.weight": ["gate.weight"],
                   "experts.w_in": ["experts.{e}.w1.weight", "experts.{e}.w3.weight"],
                   "experts.w_out": ["experts.{e}.w2.weight"]},
    },
    "qwen2_moe": {
        "hf": "modeling_qwen2_moe.py Qwen2MoeSparseMoeBlock",
        "forward": qwen2_moe,
        "names": "qwen2_moe",
        "cfg": {"num_experts": 12, "top_k": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 64,
                "norm_topk_prob": False},
        "shapes": lambda c: {"gate.weight": [c["num_experts"], D_MODEL],
                             **glu_shapes(c["moe_intermediate_size"]),
                             **glu_shapes(c["shared_expert_intermediate_size"], "shared_expert"),
                             "shared_expert_gate.weight": [1, D_MODEL]},
        "layout": {**glu_layout("experts.{e}", "shared_expert"), "experts.shared.gate": ["shared_expert_gate.weight"]},
    },
    "deepseek_v3": {
        "hf": "modeling_deepseek_v3.py DeepseekV3MoE + DeepseekV3TopkRouter",
        "forward": deepseek_v3,
        "names": "deepseek_v3",
        "cfg": {"num_experts": 16, "top_k": 4, "n_group": 4, "topk_group": 2, "moe_intermediate_size": 16,
                "n_shared_experts": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5},
        "shapes": lambda c: {"gate.weight": [c["num_experts"], D_MODEL],
                             "gate.e_score_correction_bias": [c["num_experts"]],
                             **glu_shapes(c["moe_intermediate_size"]),
                             **glu_shapes(c["moe_intermediate_size"] * c["n_shared_experts"], "shared_experts")},
        "layout": glu_layout("experts.{e}", "shared_experts"),
        "buffers": ["gate.e_score_correction_bias"],  # not trained: no gradient to compare
    },
    "olmoe": {
        "hf": "modeling_olmoe.py OlmoeSparseMoeBlock",
        "forward": olmoe,
        "names": "olmoe",
        "cfg": {"num_experts": 16, "top_k": 4, "intermediate_size": 24, "norm_topk_prob": False},
        "shapes": lambda c: {"gate.weight": [c["num_experts"], D_MODEL], **glu_shapes(c["intermediate_size"])},
        "layout": glu_layout("experts.{e}"),
    },
    "switch": {
        "hf": "modeling_switch_transformers.py SwitchTransformersSparseMLP + SwitchTransformersTop1Router",
        "forward": switch,
        "names": "switch",
        "cfg": {"num_experts": 8, "top_k": 1, "d_ff": 64, "expert_capacity": TOKENS},
        "shapes": lambda c: {"router.classifier.weight": [c["num_experts"], D_MODEL],
                             "experts.expert_{e}.wi.weight": [c["d_ff"], D_MODEL],
                             "experts.expert_{e}.wo.weight": [D_MODEL, c["d_ff"]]},
        "layout": {"router.weight": ["router.classifier.weight"], "experts.w_in": ["experts.expert_{e}.wi.weight"],
                   "experts.w_out": ["experts.expert_{e}.wo.weight"]},
    },
}
# Switch with a capacity that drops tokens: 6 per expert, which the recipe's eval_capacity_factor
# 0.75 reproduces (ceil(64 tokens * 1 / 8 experts * 0.75) = 6).
BLOCKS["switch_capacity"] = {**BLOCKS["switch"], "cfg": {**BLOCKS["switch"]["cfg"], "expert_capacity": 6},
                             "expect_drops": True}


def make_weights(block, generator):
    """Random weights under the block's HF names: normal with std 1/sqrt(fan_in), so every layer's
    output is O(1) and the routers' probabilities are well spread (clear top-k margins)."""
    cfg, weights = block["cfg"], {}
    for pattern, shape in block["shapes"](cfg).items():
        names = [pattern.format(e=e) for e in range(cfg["num_experts"])] if "{e}" in pattern else [pattern]
        for name in names:
            if name.endswith("e_score_correction_bias"):
                # Comparable to the spread of sigmoid scores, so the bias changes many choices.
                weights[name] = (torch.rand(shape, generator=generator) - 0.5) * 0.4
            else:
                weights[name] = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
    return weights


def to_moelab_layout(block, hf_tensors):
    """moelab parameter name -> tensor, stacking HF tensors as moelab stores them: per expert
    ([E, rows, cols]) when the name has {e}, else rows of one matrix ([rows, cols], shared
    experts get a leading group of 1)."""
    out = {}
    for param, pieces in block["layout"].items():
        if "{e}" in pieces[0]:
            out[param] = torch.stack([torch.cat([hf_tensors[p.format(e=e)] for p in pieces], dim=0)
                                      for e in range(block["cfg"]["num_experts"])])
        elif param.startswith("experts.shared.") and param != "experts.shared.gate":
            out[param] = torch.cat([hf_tensors[p] for p in pieces], dim=0).unsqueeze(0)
        else:
            out[param] = torch.cat([hf_tensors[p] for p in pieces], dim=0)
    return out


# ------------------------------------------------------------------------------------------------
# Comparison


def max_relative_error(actual, expected):
    """max |a - b| / max |b| over all elements (0 when both are all zeros)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def elementwise_error(actual, expected, floor_fraction):
    """max_i |a_i - b_i| / max(|b_i|, floor), floor = floor_fraction * max |b|."""
    actual, expected = actual.double(), expected.double()
    if not expected.numel():
        return 0.0
    floor = floor_fraction * expected.abs().max().item()
    denominator = expected.abs().clamp(min=floor) if floor > 0 else expected.abs().clamp(min=1e-300)
    return ((actual - expected).abs() / denominator).max().item()


def dense_weights(tokens, experts, token, expert, weight):
    """[T, E] matrix of combine weights from assignment lists (0 where a token did not choose)."""
    out = torch.zeros(tokens, experts, dtype=torch.float64)
    for t, e, g in zip(token.tolist(), expert.tolist(), weight.tolist()):
        if e >= 0:
            out[t, e] += g
    return out


class Report:
    def __init__(self, tolerance, elementwise_tolerance, floor_fraction):
        self.tolerance, self.elementwise_tolerance, self.floor_fraction = tolerance, elementwise_tolerance, floor_fraction
        self.rows, self.failures = [], []

    def tensor(self, block, what, actual, expected):
        if tuple(actual.shape) != tuple(expected.shape):
            self.failures.append(f"{block}: {what}: moelab's shape {list(actual.shape)} != reference {list(expected.shape)}")
            self.rows.append((block, what, float("nan"), float("nan"), "FAIL"))
            return
        rel = max_relative_error(actual, expected)
        elem = elementwise_error(actual, expected, self.floor_fraction)
        ok = rel < self.tolerance and elem < self.elementwise_tolerance
        if not ok:
            worst = int(((actual.double() - expected.double()).abs()).reshape(-1).argmax())
            self.failures.append(
                f"{block}: {what}: max relative error {rel:.3e} (tolerance {self.tolerance:g}), elementwise "
                f"{elem:.3e} (tolerance {self.elementwise_tolerance:g}); worst at flat index {worst}: moelab "
                f"{actual.reshape(-1)[worst].item():.9g}, reference {expected.reshape(-1)[worst].item():.9g}")
        self.rows.append((block, what, rel, elem, "ok" if ok else "FAIL"))

    def exact(self, block, what, mismatches, detail):
        if mismatches:
            self.failures.append(f"{block}: {what}: {mismatches} mismatches; {detail}")
        self.rows.append((block, what, None, mismatches, "ok" if not mismatches else "FAIL"))

    def print(self):
        print(f"{'block':<16} {'compared':<34} {'max rel err':>12} {'elementwise':>12}  status")
        for block, what, rel, elem, status in self.rows:
            if rel is None:
                print(f"{block:<16} {what:<34} {'-':>12} {str(elem) + ' diff':>12}  {status}")
            else:
                print(f"{block:<16} {what:<34} {rel:>12.3e} {elem:>12.3e}  {status}")


def compare_routing(report, name, block, routing, out):
    cfg = block["cfg"]
    tokens, experts, k = TOKENS, cfg["num_experts"], cfg["top_k"]
    token, expert = out["routing.token"].long(), out["routing.expert"].long()
    served = out["routing.final_expert"].long()
    if token.numel() != tokens * k:
        report.exact(name, "assignments", abs(token.numel() - tokens * k),
                     f"moelab made {token.numel()} assignments, the block {tokens * k}")
        return
    chosen_moelab = [set() for _ in range(tokens)]
    served_moelab = [set() for _ in range(tokens)]
    for t, e, s in zip(token.tolist(), expert.tolist(), served.tolist()):
        chosen_moelab[t].add(e)
        served_moelab[t].add(s)
    chosen_ref = [set(r) for r in routing["chosen"].tolist()]
    served_ref = [set(r) for r in routing["served"].tolist()]
    bad = [t for t in range(tokens) if chosen_moelab[t] != chosen_ref[t]]
    report.exact(name, "chosen expert sets", len(bad),
                 "first tokens: " + ", ".join(f"{t}: moelab {sorted(chosen_moelab[t])} vs reference "
                                              f"{sorted(chosen_ref[t])}" for t in bad[:4]))
    bad = [t for t in range(tokens) if served_moelab[t] != served_ref[t]]
    report.exact(name, "serving experts (after capacity)", len(bad),
                 "first tokens (-1 = dropped): " + ", ".join(f"{t}: moelab {sorted(served_moelab[t])} vs reference "
                                                             f"{sorted(served_ref[t])}" for t in bad[:4]))
    ref_tokens = torch.arange(tokens).repeat_interleave(k)
    report.tensor(name, "combine weights [T, E]",
                  dense_weights(tokens, experts, token, expert, out["routing.weight"]),
                  dense_weights(tokens, experts, ref_tokens, routing["chosen"].reshape(-1),
                                routing["weight"].detach().reshape(-1)))


def run_block(name, block, args, work, generator, report):
    cfg = block["cfg"]
    x = torch.randn(TOKENS, D_MODEL, generator=generator)
    dy = torch.randn(TOKENS, D_MODEL, generator=generator)  # R of the loss sum(y * R)
    weights = make_weights(block, generator)
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "x.safetensors", {"x": x})
    write_safetensors(folder / "dy.safetensors", {"dy": dy})
    write_safetensors(folder / "weights.safetensors", weights, {"format": block["names"]})

    # The reference: forward, then autograd of sum(y * R).
    x_ref = x.clone().requires_grad_(True)
    buffers = set(block.get("buffers", []))
    w_ref = {n: (t.clone().requires_grad_(n not in buffers)) for n, t in weights.items()}
    y_ref, routing = block["forward"](x_ref, w_ref, cfg)
    (y_ref * dy).sum().backward()

    recipe = args.recipes / f"{name}.toml"
    output = folder / "out.safetensors"
    command = [str(args.moelab), "layer", str(recipe), "--names", block["names"], "--weights",
               str(folder / "weights.safetensors"), "--input", str(folder / "x.safetensors"), "--output", str(output),
               "--grad", str(folder / "dy.safetensors"), "--eval"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: `{' '.join(command)}` exited {result.returncode}:\n{result.stdout}{result.stderr}")
    out, metadata = read_safetensors(output)

    report.tensor(name, "y [T, d]", out["y"], y_ref.detach())
    report.tensor(name, "router logits [T, E]", out["routing.logits"], routing["logits"].detach())
    compare_routing(report, name, block, routing, out)
    notes = routing.get("notes", {})
    if MASKING_NOTE in notes:
        report.exact(name, "0.0 vs -inf group masking agree", notes[MASKING_NOTE],
                     "HF's get_topk_indices masks dropped groups with 0.0, moelab (like DeepSeek's own code) with "
                     "-inf; a negative biased score then lets HF pick an expert of a dropped group. This is the "
                     "documented semantic difference (docs/reference-check.md), not a precision problem: choose "
                     "another --seed or a bias that keeps the biased scores positive")
    if block.get("expect_drops"):
        dropped = notes["tokens dropped by capacity"]
        report.exact(name, "capacity drops some tokens", 0 if dropped > 0 else 1,
                     "the reference dropped no token: the capacity case tests nothing")
        report.exact(name, "dropped count (moelab metadata)", abs(int(metadata.get("dropped", -1)) - dropped),
                     f"moelab dropped {metadata.get('dropped')}, the reference {dropped}")

    report.tensor(name, "grad x", out["grad.x"], x_ref.grad)
    hf_grads = {n: t.grad if t.grad is not None else torch.zeros_like(t) for n, t in w_ref.items() if n not in buffers}
    for param, grad in to_moelab_layout(block, hf_grads).items():
        key = f"grad.{param}"
        if key not in out:
            report.exact(name, f"grad {param}", 1, f"moelab's output has no '{key}'")
            continue
        report.tensor(name, f"grad {param}", out[key], grad)
    extra = sorted(k for k in out if k.startswith("grad.") and k[5:] != "x" and k[5:] not in block["layout"])
    report.exact(name, "moelab parameters without HF name", len(extra), f"unmapped: {extra}")
    return notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moelab", required=True, type=pathlib.Path, help="the moelab executable (build/bin/moelab)")
    parser.add_argument("--recipes", type=pathlib.Path, default=REPO_ROOT / "tests" / "reference" / "recipes",
                        help="folder with one recipe per block (default: tests/reference/recipes)")
    parser.add_argument("--work", type=pathlib.Path, help="folder for the tensor files (default: a temporary one)")
    parser.add_argument("--blocks", nargs="+", choices=sorted(BLOCKS), default=list(BLOCKS), help="blocks to check")
    parser.add_argument("--seed", type=int, default=20240607, help="seed of inputs and weights")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="bound on every max relative error")
    parser.add_argument("--elementwise-tolerance", type=float, default=1e-4,
                        help="bound on every elementwise error (floor 1e-2 * max|reference|)")
    args = parser.parse_args()
    if not args.moelab.is_file():
        print(f"hf_moe_blocks: --moelab {args.moelab}: no such file", file=sys.stderr)
        return EXIT_ERROR
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)  # deterministic reductions, and the machine is shared

    report = Report(args.tolerance, args.elementwise_tolerance, floor_fraction=1e-2)
    notes = {}
    with tempfile.TemporaryDirectory(prefix="hf_moe_blocks.") as scratch:
        work = args.work or pathlib.Path(scratch)
        for name in args.blocks:
            # One generator per block, seeded by its position in BLOCKS: a block's data does not
            # depend on which others run.
            generator = torch.Generator().manual_seed(args.seed + list(BLOCKS).index(name))
            try:
                notes[name] = run_block(name, BLOCKS[name], args, work, generator, report)
            except (RuntimeError, ValueError, KeyError, OSError) as error:
                print(f"hf_moe_blocks: {error}", file=sys.stderr)
                return EXIT_ERROR

    print(f"torch {torch.__version__}, float32, {TOKENS} tokens, d_model {D_MODEL}, seed {args.seed}")
    report.print()
    for name, block_notes in notes.items():
        for what, count in block_notes.items():
            print(f"note: {name}: {what}: {count}")
    if report.failures:
        print(f"\nhf_moe_blocks: FAILED: {len(report.failures)} comparisons disagree:", file=sys.stderr)
        for failure in report.failures:
            print(f"  {failure}", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"hf_moe_blocks: all {len(args.blocks)} blocks agree (max relative error < {args.tolerance:g})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
