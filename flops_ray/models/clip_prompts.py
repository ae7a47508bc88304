"""A frozen CLIP seen as a model-as-a-service: zero-shot classification losses of text and image prompts.

Paper section 5.2 (appendix C.2): both encoders are frozen; a text prefix prompt ``p_T (T_T, E_T)`` goes right
after the text's BOS (CLIP's CLS of the text) and before the class words, and an image suffix prompt
``p_I (T_I, E_I)`` goes after the image's patch tokens. :class:`CLIPPromptLoss` is the black box's batched loss
``fn(thetas (R, D), x (R, 3, S, S), y (R,)) -> (R,)``: row ``r`` of ``thetas`` is ``[p_T, p_I]`` flattened
(``D = T_T E_T + T_I E_I``), and the loss is the cross-entropy of the scaled cosine similarities between the
prompted image and the ``C`` prompted class texts. The :class:`~flops_ray.models.blackbox.BlackBox` holding it
gives ``theta = p0 + u W``, which is the paper's ``p = z W``. Rows that share a text prompt (every row of a clean
pass) encode the class texts once, and the ``C`` class texts of a row share its prompt's encoding (the text encoder
is causal: ``[BOS] p_T`` reads the same before every class's words).

The manual prompt (``"a photo of a {class}."``) is :meth:`CLIPPromptLoss.manual_logits`: plain CLIP, no prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flops_ray.models.hf import hf_source, transformers_module


def load_clip(name_or_dir: str) -> tuple[Any, Any, Any]:
    """A CLIP model (eval mode, gradients off), its tokenizer and its image processor from ``hf:<id or directory>``
    (or the bare id or directory), all through ``from_pretrained``: a hub id goes through huggingface_hub's
    cache (``HF_HUB_OFFLINE=1`` applies), a directory is read as it is.

    Raises:
        ImportError: transformers is not installed.
    """
    transformers = transformers_module()
    source = hf_source(name_or_dir)
    model = transformers.CLIPModel.from_pretrained(source).eval().requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    processor = transformers.AutoImageProcessor.from_pretrained(source)
    return model, tokenizer, processor


def encode_texts(tokenizer: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` as ``[BOS] words [EOS]`` right-padded ids ``(C, L)`` and each text's EOS position ``(C,)``; BOS and
    EOS are added here (not by the tokenizer), so a word-level tokenizer without a template serves as CLIP's does."""
    rows = [
        [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for t in texts
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) - 1 for r in rows])


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(1, 1, L, L)`` additive mask: each token sees itself and the tokens before it (CLIP's text encoder)."""
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)[
        None, None
    ]


def _prefixed_layer(layer: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One CLIP encoder layer (pre-norm attention, then MLP) on ``C`` causal sequences that share a prefix:
    ``prefix (U, n, E)`` is encoded once per row, and each class's tokens ``suffix (B, C, S, E)`` (``B`` 1 or
    ``U``) attend to the prefix's keys and values and causally to their own. Returns ``(U, n, E)``, ``(U, C, S, E)``."""
    attn = layer.self_attn
    heads = lambda x: x.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(-3, -2)  # noqa: E731 (.., H, T, d)
    xp, xs = layer.layer_norm1(prefix), layer.layer_norm1(suffix)
    qp, kp, vp = (heads(proj(xp)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # (U, H, n, d)
    qs, ks, vs = (heads(proj(xs)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # (B, C, H, S, d)
    out_p = nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=attn.scale)
    n, s = prefix.shape[1], suffix.shape[2]
    own = (qs @ ks.transpose(-1, -2)) * attn.scale  # (B, C, H, S, S)
    own = own.masked_fill(torch.ones(s, s, dtype=torch.bool, device=own.device).triu(1), float("-inf"))
    shared = (qs @ kp[:, None].transpose(-1, -2)) * attn.scale  # (U, C, H, S, n)
    weights = torch.cat([shared, own.expand(len(shared), -1, -1, -1, -1)], -1).softmax(-1)
    out_s = weights[..., :n] @ vp[:, None] + weights[..., n:] @ vs  # (U, C, H, S, d)
    prefix = prefix + attn.out_proj(out_p.transpose(-3, -2).flatten(-2))
    suffix = suffix + attn.out_proj(out_s.transpose(-3, -2).flatten(-2))
    return prefix + layer.mlp(layer.layer_norm2(prefix)), suffix + layer.mlp(layer.layer_norm2(suffix))


class CLIPPromptLoss(nn.Module):
    """Zero-shot cross-entropy of a frozen CLIP under text and image prompts (the black box's loss function).

    Args:
        clip: a transformers ``CLIPModel`` (frozen here).
        class_ids: ``(C, L)`` ids of each class's text without prompt (:func:`encode_texts`, e.g. of ``"{class}."``).
        class_eos: ``(C,)`` position of each class text's EOS in ``class_ids``.
        text_tokens: ``T_T``, text prompt tokens after the BOS.
        image_tokens: ``T_I``, image prompt tokens after the patches.
    """

    def __init__(
        self, clip: nn.Module, class_ids: torch.Tensor, class_eos: torch.Tensor, text_tokens: int, image_tokens: int
    ):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.register_buffer("class_ids", class_ids)
        self.register_buffer("class_eos", class_eos)
        self.text_tokens = text_tokens
        self.image_tokens = image_tokens
        self.text_width = clip.config.text_config.hidden_size
        self.image_width = clip.config.vision_config.hidden_size

    @property
    def prompt_size(self) -> int:
        """``D``: numbers in one ``[p_T, p_I]`` row."""
        return self.text_tokens * self.text_width + self.image_tokens * self.image_width

    def split(self, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, D)`` -> ``p_T (R, T_T, E_T)``, ``p_I (R, T_I, E_I)``."""
        cut = self.text_tokens * self.text_width
        return (
            thetas[:, :cut].reshape(len(thetas), self.text_tokens, self.text_width),
            thetas[:, cut:].reshape(len(thetas), self.image_tokens, self.image_width),
        )

    def text_features(self, p_text: torch.Tensor) -> torch.Tensor:
        """``(U, T_T, E_T)`` prompts -> ``(U, C, P)`` unit class embeddings, ``[BOS] p_T words [EOS]`` per class.

        CLIP's text encoder is causal, so the prefix ``[BOS] p_T`` encodes the same for every class: it runs once
        per prompt row, and each class's words attend to its keys and values (:func:`_prefixed_layer`), the
        same numbers as encoding the ``C`` whole sequences at a fraction of the cost."""
        text = self.clip.text_model
        words = text.embeddings.token_embedding(self.class_ids).to(p_text.dtype)  # (C, L, E)
        positions = text.embeddings.position_embedding.weight.to(p_text.dtype)
        n = 1 + self.text_tokens  # the prefix: BOS and the prompt
        prefix = torch.cat([words[:1, :1].expand(len(p_text), -1, -1), p_text], 1) + positions[:n]  # (U, n, E)
        suffix = (words[:, 1:] + positions[n : n + words.shape[1] - 1])[None]  # (1, C, L - 1, E): no row's yet
        for layer in text.encoder.layers:
            prefix, suffix = _prefixed_layer(layer, prefix, suffix)
        hidden = text.final_layer_norm(suffix[:, torch.arange(len(self.class_ids)), self.class_eos - 1])  # (U, C, E)
        return nn.functional.normalize(self.clip.text_projection(hidden), dim=-1)

    def image_features(self, images: torch.Tensor, p_image: torch.Tensor | None) -> torch.Tensor:
        """``(R, 3, S, S)`` preprocessed images, ``(R, T_I, E_I)`` prompts (None: none) -> ``(R, P)`` unit
        embeddings; the prompt tokens follow the patch tokens and carry no position embedding."""
        vision = self.clip.vision_model
        hidden = vision.embeddings(images.to(vision.embeddings.patch_embedding.weight.dtype))  # (R, 1 + N, E)
        if p_image is not None:
            hidden = torch.cat([hidden, p_image.to(hidden.dtype)], 1)
        hidden = vision.encoder(inputs_embeds=vision.pre_layrnorm(hidden)).last_hidden_state
        pooled = vision.post_layernorm(hidden[:, 0])
        return nn.functional.normalize(self.clip.visual_projection(pooled), dim=-1)

    def logits(self, thetas: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``(R, C)`` scaled cosine similarities of each row's prompted image to the prompted class texts."""
        p_text, p_image = self.split(thetas)
        # Rows that share a text prompt share its class embeddings: a clean pass encodes the texts once.
        unique, inverse = torch.unique(p_text.flatten(1), dim=0, return_inverse=True)
        texts = self.text_features(unique.view(-1, self.text_tokens, self.text_width))[inverse]  # (R, C, P)
        image = self.image_features(images, p_image)  # (R, P)
        return self.clip.logit_scale.exp() * torch.einsum("rp,rcp->rc", image.to(texts.dtype), texts)

    def forward(self, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(R,)`` cross-entropy of each row's prompts on its image ``x[r]`` and label ``y[r]``."""
        return nn.functional.cross_entropy(self.logits(thetas, x).float(), y.long(), reduction="none")

    def manual_logits(self, manual_ids: torch.Tensor, manual_eos: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` plain CLIP's scaled similarities to the class texts ``manual_ids (C, L)`` (e.g. of
        ``"a photo of a {class}."``), no prompt anywhere."""
        text = self.clip.text_model
        length = manual_ids.shape[1]
        seq = text.embeddings(input_ids=manual_ids)
        hidden = text.encoder(inputs_embeds=seq, attention_mask=_causal_mask(length, seq.dtype, seq.device))
        pooled = text.final_layer_norm(hidden.last_hidden_state)[torch.arange(len(manual_ids)), manual_eos]
        texts = nn.functional.normalize(self.clip.text_projection(pooled), dim=-1)
        return self.clip.logit_scale.exp() * self.image_features(images, None) @ texts.T
