"""Transformer encoders shaped like Hugging Face's BertModel, GPT2Model and ViTModel (their
eager attention path), in plain torch: the benchmark and the tests use them without the
transformers dependency, with the structure that decides what autograd keeps (attention
with dropout, GELU feed-forward, LayerNorm, per-branch LoRA dropout via ``models.add_lora``).

BERT: embeddings (word + token type + position, LayerNorm, dropout); per layer q/k/v linears,
scores = q @ k^T / sqrt(d_head) + additive mask, softmax, dropout, @ v, output dense,
dropout, LayerNorm(h + x); intermediate dense + GELU, output dense, dropout, LayerNorm(h + x);
pooler (dense + tanh on token 0), classifier. GPT-2: pre-LN blocks, one fused c_attn
(``Conv1D``: addmm with the weight transposed), causal mask by ``torch.where``, GELU (tanh),
tied LM head. ViT: 16x16 patches by a convolution, CLS token, pre-LN layers as BERT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import add_lora

__all__ = [
    "Config",
    "BertForSequenceClassification",
    "GPT2LMHeadModel",
    "ViTForImageClassification",
    "Conv1D",
    "bert_shaped",
    "gpt2_shaped",
    "vit_shaped",
    "encoder_layers",
    "task_heads",
    "peft_lora",
    "FINE_TUNING",
]


@dataclass
class Config:
    vocab: int = 1000
    d: int = 256
    heads: int = 4
    ff: int = 1024
    layers: int = 4
    dropout: float = 0.1
    max_pos: int = 512
    type_vocab: int = 2
    eps: float = 1e-12
    num_labels: int = 2


# ---------------------------------------------------------------------------- BERT
class BertEmbeddings(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab, c.d)
        self.position_embeddings = nn.Embedding(c.max_pos, c.d)
        self.token_type_embeddings = nn.Embedding(c.type_vocab, c.d)
        self.LayerNorm = nn.LayerNorm(c.d, eps=c.eps)
        self.dropout = nn.Dropout(c.dropout)
        self.register_buffer("position_ids", torch.arange(c.max_pos).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, c.max_pos, dtype=torch.long), persistent=False)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        position_ids = self.position_ids[:, :T]
        token_type_ids = self.token_type_ids[:, :T].expand(input_ids.shape[0], T)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.num_attention_heads = c.heads
        self.attention_head_size = c.d // c.heads
        self.all_head_size = c.d
        self.query = nn.Linear(c.d, c.d)
        self.key = nn.Linear(c.d, c.d)
        self.value = nn.Linear(c.d, c.d)
        self.dropout = nn.Dropout(c.dropout)

    def transpose_for_scores(self, x):
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None):
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            attention_scores = attention_scores + attention_mask
        attention_probs = F.softmax(attention_scores, dim=-1)
        attention_probs = self.dropout(attention_probs)
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        return context_layer.view(*context_layer.shape[:-2], self.all_head_size)


class BertOutput(nn.Module):
    """BertSelfOutput (``features`` d) and BertOutput (``features`` ff): dense, dropout, the
    residual, LayerNorm."""

    def __init__(self, c: Config, features: int):
        super().__init__()
        self.dense = nn.Linear(features, c.d)
        self.LayerNorm = nn.LayerNorm(c.d, eps=c.eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertOutput(c, c.d)

    def forward(self, hidden_states, attention_mask=None):
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, c: Config, approximate: str = "none"):
        super().__init__()
        self.dense = nn.Linear(c.d, c.ff)
        self.intermediate_act_fn = nn.GELU(approximate)

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c, c.ff)

    def forward(self, hidden_states, attention_mask=None):
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c) for _ in range(c.layers)])

    def forward(self, hidden_states, attention_mask=None):
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.dense = nn.Linear(c.d, c.d)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class BertModel(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)
        self.pooler = BertPooler(c)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        dtype = self.embeddings.word_embeddings.weight.dtype
        extended = attention_mask[:, None, None, :].to(dtype)
        extended = (1.0 - extended) * torch.finfo(dtype).min
        sequence_output = self.encoder(self.embeddings(input_ids), extended)
        return sequence_output, self.pooler(sequence_output)


class BertForSequenceClassification(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.bert = BertModel(c)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.d, c.num_labels)

    def forward(self, input_ids, attention_mask=None):
        _, pooled = self.bert(input_ids, attention_mask)
        return self.classifier(self.dropout(pooled))


# ---------------------------------------------------------------------------- GPT-2
class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a linear layer with the weight transposed."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.embed_dim, self.num_heads = c.d, c.heads
        self.head_dim = c.d // c.heads
        self.register_buffer("bias", torch.tril(torch.ones(c.max_pos, c.max_pos, dtype=torch.bool)).view(1, 1, c.max_pos, c.max_pos), persistent=False)
        self.c_attn = Conv1D(3 * c.d, c.d)
        self.c_proj = Conv1D(c.d, c.d)
        self.attn_dropout = nn.Dropout(c.dropout)
        self.resid_dropout = nn.Dropout(c.dropout)

    def _split_heads(self, t):
        return t.view(t.size()[:-1] + (self.num_heads, self.head_dim)).permute(0, 2, 1, 3)

    def forward(self, hidden_states):
        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device)
        T = query.size(-2)
        causal_mask = self.bias[:, :, :T, :T]
        mask_value = torch.full([], torch.finfo(attn_weights.dtype).min, dtype=attn_weights.dtype, device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = F.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        attn_output = torch.matmul(attn_weights, value)
        attn_output = attn_output.permute(0, 2, 1, 3).contiguous()
        attn_output = attn_output.view(attn_output.size()[:-2] + (self.embed_dim,))
        return self.resid_dropout(self.c_proj(attn_output))


class GPT2MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c_fc = Conv1D(c.ff, c.d)
        self.c_proj = Conv1D(c.d, c.ff)
        self.act = nn.GELU("tanh")
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, h):
        return self.dropout(self.c_proj(self.act(self.c_fc(h))))


class GPT2Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d, eps=c.eps)
        self.attn = GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.d, eps=c.eps)
        self.mlp = GPT2MLP(c)

    def forward(self, hidden_states):
        hidden_states = self.attn(self.ln_1(hidden_states)) + hidden_states
        return self.mlp(self.ln_2(hidden_states)) + hidden_states


class GPT2LMHeadModel(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab, c.d)
        self.wpe = nn.Embedding(c.max_pos, c.d)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList([GPT2Block(c) for _ in range(c.layers)])
        self.ln_f = nn.LayerNorm(c.d, eps=c.eps)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        position_ids = torch.arange(T).unsqueeze(0)
        h = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for block in self.h:
            h = block(h)
        h = self.ln_f(h)
        return F.linear(h, self.wte.weight)  # tied LM head


# ---------------------------------------------------------------------------- ViT
class ViTSelfAttention(BertSelfAttention):
    pass


class ViTLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(c.d, eps=c.eps)
        self.attention = ViTSelfAttention(c)
        self.attention_output = nn.Linear(c.d, c.d)  # ViTSelfOutput.dense
        self.attention_dropout = nn.Dropout(c.dropout)
        self.layernorm_after = nn.LayerNorm(c.d, eps=c.eps)
        self.intermediate = nn.Linear(c.d, c.ff)
        self.act = nn.GELU()
        self.output = nn.Linear(c.ff, c.d)
        self.output_dropout = nn.Dropout(c.dropout)

    def forward(self, hidden_states):
        attn = self.attention_dropout(self.attention_output(self.attention(self.layernorm_before(hidden_states))))
        hidden_states = attn + hidden_states
        h = self.act(self.intermediate(self.layernorm_after(hidden_states)))
        return self.output_dropout(self.output(h)) + hidden_states


class ViTForImageClassification(nn.Module):
    def __init__(self, c: Config, image: int = 224, patch: int = 16, channels: int = 3):
        super().__init__()
        self.config = c
        self.projection = nn.Conv2d(channels, c.d, kernel_size=patch, stride=patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, c.d) * 0.02)
        self.position_embeddings = nn.Parameter(torch.randn(1, n + 1, c.d) * 0.02)
        self.dropout = nn.Dropout(c.dropout)
        self.layer = nn.ModuleList([ViTLayer(c) for _ in range(c.layers)])
        self.layernorm = nn.LayerNorm(c.d, eps=c.eps)
        self.classifier = nn.Linear(c.d, c.num_labels)

    def forward(self, pixel_values):
        x = self.projection(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        h = self.dropout(x + self.position_embeddings)
        for layer in self.layer:
            h = layer(h)
        return self.classifier(self.layernorm(h)[:, 0, :])



def bert_shaped(config: Config | None = None) -> BertForSequenceClassification:
    """4 layers, d 256, 4 heads, ff 1024, dropout 0.1 by default."""
    return BertForSequenceClassification(config or Config())


def gpt2_shaped(config: Config | None = None) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(config or Config(eps=1e-5))


def vit_shaped(config: Config | None = None, image: int = 224) -> ViTForImageClassification:
    return ViTForImageClassification(config or Config(num_labels=10), image=image)


def encoder_layers(model: nn.Module) -> nn.Module:
    """The stack LoRA adapters go into (the task heads stay outside)."""
    if isinstance(model, BertForSequenceClassification):
        return model.bert.encoder
    if isinstance(model, GPT2LMHeadModel):
        return model.h
    return model.layer


def task_heads(model: nn.Module) -> list[nn.Module]:
    """What fine-tuning trains besides adapters or biases (GPT-2's tied LM head stays frozen)."""
    if isinstance(model, (BertForSequenceClassification, ViTForImageClassification)):
        return [model.classifier]
    return []


def peft_lora(model: nn.Module, rank: int = 4, alpha: float = 8, dropout: float = 0.1) -> None:
    """PEFT's LoRA for sequence classification: every linear of the encoder layers wrapped
    (rank 4, alpha 8, its own dropout 0.1), the base frozen, the task head trainable."""
    model.requires_grad_(False)
    add_lora(encoder_layers(model), rank, alpha, dropout)
    for head in task_heads(model):
        head.requires_grad_(True)


def _train(model: nn.Module, chosen) -> None:
    model.requires_grad_(False)
    for parameter in chosen:
        parameter.requires_grad_(True)
    for head in task_heads(model):
        head.requires_grad_(True)


#: The usual ways to fine-tune an encoder: everything; biases only (BitFit); LayerNorms only;
#: LoRA. All but the first train the task head too.
FINE_TUNING = {
    "all": lambda m: m.requires_grad_(True),
    "bias": lambda m: _train(m, (p for n, p in m.named_parameters() if n.endswith("bias"))),
    "norm": lambda m: _train(m, (p for x in m.modules() if isinstance(x, nn.LayerNorm) for p in x.parameters())),
    "lora": peft_lora,
}
