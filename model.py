"""The policy: a Qwen2.5-VL model, its tokenizer and vision preprocessing, generation, log-probs.

Owns: building the embedded tiny model (real Qwen2.5-VL classes from a config, a byte-level BPE
tokenizer trained locally with Qwen's special tokens), loading any Qwen2.5-VL checkpoint directory
with from_pretrained, writing a model folder that transformers 5 and 4.x both read, turning
frames into `pixel_values` / `image_grid_thw`, building what the model reads from a decoded video
and a question (`model_input`, the one place), sampling G completions per prompt from one shared
prefill, and per-token log-probs of completions (shared-prefix fast path and the plain repeated
path). Every visual-tensor detail (pixel values,
grid sizes, multimodal rope positions, prefix caching) lives here and nowhere else.
Leaves what the prompt says to data.py and what a completion is worth to rewards.py.

Frames go in as images (one image per frame, as the release shows them), so only the image path of
Qwen2.5-VL is used: each frame becomes grid (1, h, w) of 14-pixel patches, merged 2x2 into
h*w/4 tokens. transformers' Qwen2.5-VL processor needs torchvision, so the few lines that turn
frames into patches are written here with einops (tests check them against the PIL image
processor on still images).

Gradient checkpointing (enable_gradient_checkpointing) is our own, per layer: transformers' switch
drops the KV cache in training, which the shared-prefix path reads.

Many prompts at once (generate_groups, groups_logprobs, the last section): each prompt prefilled
once, all groups' rows decoded or scored together; batch size 1 is the one-prompt path above.
Decoding writes into a KV cache allocated once per call (SlotCache), not one grown token by token.

Test: python -m pytest tests/test_model.py tests/test_batch.py
"""
import inspect
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
from einops import rearrange
from transformers import AutoTokenizer, DynamicCache, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import Cache, DynamicLayer

import data
from data import (ENDOFTEXT, GROUNDING_TAGS, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START,
                  Special)

# Qwen2.5-VL's special tokens (the names are the checkpoint's; ids come from the tokenizer).
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
MM_TEXT, MM_IMAGE = 0, 1  # mm_token_type_ids values


def check_transformers(text_forward):
    """Refuse a transformers whose text model takes the KV cache as past_key_values (before 5.24):
    our calls pass cache=, which such a version puts into **kwargs unread, so every decoded token
    would see only itself: garbage answers and no error (seen with 5.17 on a GPU machine)."""
    if "cache" not in inspect.signature(text_forward).parameters:
        raise ImportError(f"transformers {transformers.__version__}: its Qwen2.5-VL text model takes no `cache` "
                          f"argument (it came in 5.24); install requirements.txt (transformers>=5.24,<6)")


check_transformers(transformers.Qwen2_5_VLTextModel.forward)


# ---------------------------------------------------------------------------------------------
# The embedded default: a tiny Qwen2.5-VL, built locally
# ---------------------------------------------------------------------------------------------

@dataclass
class TinyModelConfig:
    vocab_size: int = 1024        # BPE merges learned from the corpus, plus special tokens
    hidden_size: int = 192        # text width
    num_layers: int = 4
    num_heads: int = 6            # head_dim 32
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vision_hidden_size: int = 96
    vision_depth: int = 2
    vision_heads: int = 3
    frame_pixels: int = 112 * 112  # per-frame pixel budget written to preprocessor_config.json
    patch_size: int = 14          # vision patch side in pixels (merged 2x2 into one token)
    value_tokens: int = 0         # > 0: one token per integer 0..value_tokens-1 (a coordinate is one
                                  # token, not one per digit); 0: Qwen's single-digit split
    value_init: str = "random"    # value tokens' embedding rows: random | ordinal (nearby values alike)
    value_freqs: int = 32         # ordinal init: cosine frequencies (kernel width ~ value_tokens / this)


def build_tokenizer(texts, vocab_size=1024, value_tokens=0):
    """Byte-level BPE with Qwen's split rule and special tokens, trained on `texts`.

    value_tokens > 0 adds the integers 0..value_tokens-1 as whole tokens. Added tokens are matched
    before the split rule, longest first, so "[12,105,40,58]" reads as [ 12 , 105 , 40 , 58 ]: a
    box costs four value tokens to write. The text is unchanged; a real checkpoint keeps its own
    tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.add_tokens(GROUNDING_TAGS)  # one token per tag: cheap to learn, still plain text on decode
    fast.add_tokens([str(v) for v in range(value_tokens)])
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Qwen's chat layout, text-only part (frames are inserted by data.render_prompt / tokenize_prompt).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_model(out_dir, texts, cfg=TinyModelConfig(), seed=0):
    """Train the tokenizer on `texts`, build a random tiny Qwen2.5-VL, save everything to out_dir."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(texts, cfg.vocab_size, cfg.value_tokens)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = cfg.hidden_size // cfg.num_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                         max_position_embeddings=8192, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": _mrope_section(head_dim)},
                         bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT]),
        vision_config=dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size,
                           num_heads=cfg.vision_heads, intermediate_size=2 * cfg.vision_hidden_size,
                           out_hidden_size=cfg.hidden_size, patch_size=cfg.patch_size, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[cfg.vision_depth - 1],
                           tokens_per_second=2),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True)
    model = Qwen2_5_VLForConditionalGeneration(config)
    if cfg.value_tokens and cfg.value_init == "ordinal":
        rows = tokenizer.convert_tokens_to_ids([str(v) for v in range(cfg.value_tokens)])
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[rows] = ordinal_embeddings(cfg.value_tokens, cfg.hidden_size, cfg.value_freqs,
                                           emb.norm(dim=1).mean().item())
    elif cfg.value_init not in ("ordinal", "random"):
        raise ValueError(f"TinyModelConfig.value_init={cfg.value_init!r}: expected ordinal or random")
    model.generation_config.eos_token_id = [ids[IM_END], ids[ENDOFTEXT]]
    model.generation_config.pad_token_id = ids[ENDOFTEXT]
    save_model_folder(out_dir, model, tokenizer,
                      VisionProcessor(patch_size=cfg.patch_size, max_pixels=cfg.frame_pixels, min_pixels=4 * 28 * 28))
    return model, tokenizer


def ordinal_embeddings(n, dim, freqs, norm):
    """Embedding rows for the values 0..n-1 in which nearby values are alike: (n, dim).

    Row v holds x and -x^2/2 for x = v scaled to [-1, 1], and cos(pi f (v + 1/2) / n) for
    f = 1..freqs (half periods, so 0 and n-1 are not neighbours), in a random (freqs + 2)-dim
    subspace, scaled to `norm`. The embeddings are tied, so a hidden state h gives value logits
    h . e_v: with h = k (u, 1, ...) the first two give -k (x_v - x_u)^2 / 2, a bump at u from a
    hidden state linear in u; the cosines can sharpen it. The head starts ordinal instead of
    learning n unrelated classes.
    """
    v = torch.arange(n, dtype=torch.float32) + 0.5
    x = 2 * v / n - 1
    f = torch.arange(1, freqs + 1, dtype=torch.float32)
    cos = torch.cos(torch.pi * v[:, None] * f[None] / n) / freqs ** 0.5     # (n, freqs)
    basis = torch.cat([x[:, None], -x[:, None] ** 2 / 2, cos], dim=1)       # (n, freqs + 2)
    basis = basis - basis.mean(0)
    q, _ = torch.linalg.qr(torch.randn(dim, freqs + 2))                     # (dim, freqs + 2) orthonormal
    rows = basis @ q.T                                                      # (n, dim)
    return rows * norm / rows.norm(dim=1, keepdim=True).mean()


@torch.no_grad()
def rescale_residual(vlm, embed_norm=None):
    """Rescale a Qwen2.5-VL's weights in place so its residual stream is smaller by a factor c and
    every RMSNorm gain is 1, computing the same function (up to the norms' epsilon). -> c.
    embed_norm: the mean embedding row norm wanted; None -> a freshly built model's
    (initializer_range * sqrt(hidden size), ~0.28 for the tiny model).

    Each RMSNorm's gain is folded into the linears it feeds (q/k/v, gate/up); everything that
    writes into the residual stream (token embeddings, the vision merger's output, o_proj,
    down_proj) is divided by c, chosen so the mean embedding row norm becomes embed_norm; the
    final norm's gain is multiplied by c where the output head is the (now smaller) embedding.
    Why: AdamW moves every weight by about lr per step whatever its size. The probe's weight decay
    (on every parameter) shrinks its norm gains (to ~0.2) and the embeddings grow to make up (row
    norm ~5 against ~0.3 at init), so SFT at its usual lr barely moves the embeddings and jolts
    the gains; SFT from the same function at a fresh model's scale learns the grammar in an epoch.
    """
    lm = vlm.model.language_model
    emb = lm.embed_tokens.weight
    if embed_norm is None:
        embed_norm = vlm.config.get_text_config().initializer_range * emb.shape[1] ** 0.5
    c = emb.norm(dim=1).mean().item() / embed_norm
    for layer in lm.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                              (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            for lin in readers:
                lin.weight.mul_(norm.weight[None, :])
            norm.weight.fill_(1.0)
    writers = [lin for layer in lm.layers for lin in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    for lin in writers + [vlm.model.visual.merger.mlp[-1]]:
        lin.weight.div_(c)
        if lin.bias is not None:
            lin.bias.div_(c)
    emb.div_(c)
    if vlm.config.tie_word_embeddings:
        lm.norm.weight.mul_(c)
    return c


def _mrope_section(head_dim):
    """Split head_dim/2 rotary frequencies over (time, height, width) like Qwen (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def load_policy(path, device="cpu", dtype=torch.float32, attn_implementation="sdpa"):
    """Any Qwen2.5-VL checkpoint directory (ours or a real 3B/7B) -> (model, tokenizer, vision)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; not a model directory (run the main job, "
                                f"or pass --model a Qwen2.5-VL checkpoint directory)")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                               attn_implementation=attn_implementation).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, VisionProcessor.load(path)


# ---------------------------------------------------------------------------------------------
# The model folder: what a user uploads, in the form transformers 5 writes and 4.x reads
# ---------------------------------------------------------------------------------------------

def save_model_folder(path, model, tokenizer, vision, state_dict=None):
    """config, weights, generation config, tokenizer and preprocessor config into `path`, nothing
    else; config.json and tokenizer_config.json also carry what transformers 4.x readers need.
    state_dict: the full weights when the model's own are sharded (FSDP / ZeRO-3)."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    vision.save(path)
    for name, add in (("config.json", v4_config), ("tokenizer_config.json", v4_tokenizer_config)):
        with open(os.path.join(path, name)) as f:
            written = json.load(f)
        with open(os.path.join(path, name), "w") as f:
            json.dump(add(written), f, indent=2, sort_keys=True)


def v4_config(config):
    """A Qwen2.5-VL config.json as transformers 5 writes it -> the same with what 4.x reads added.
    5.x nests the text model in text_config with rope_parameters; 4.51 reads the text fields at the
    top level, 4.52+ reads text_config, and both take the mrope section from rope_scaling (without it
    the first forward fails) and the tying from the text config (else lm_head is left random)."""
    out, text = dict(config), dict(config.get("text_config") or {})
    rope = dict(text.get("rope_parameters") or config.get("rope_parameters") or {})
    if rope:
        scaling = {"rope_type": "default", **{k: v for k, v in rope.items() if k != "rope_theta"}}
        text.setdefault("rope_scaling", scaling)
        if "rope_theta" in rope:
            text.setdefault("rope_theta", rope["rope_theta"])
    if "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    if "dtype" in config:
        out.setdefault("torch_dtype", config["dtype"])                  # 4.x's name for it
    out.pop("text_config", None)
    for key, value in text.items():                                     # the flat form, for 4.51
        if key not in ("model_type", "architectures"):
            out.setdefault(key, value)
    return out


def v4_tokenizer_config(config):
    """tokenizer_config.json as transformers 5 writes it -> one 4.x and 5.x both read the same way:
    5.x's generic class name and its list of extra special tokens become the names 4.x knows."""
    out = dict(config)
    if out.get("tokenizer_class") == "TokenizersBackend":
        out["tokenizer_class"] = "PreTrainedTokenizerFast"              # loads tokenizer.json as it is
    if isinstance(out.get("extra_special_tokens"), list):
        out["additional_special_tokens"] = out.pop("extra_special_tokens")  # 4.x expects a dict there
    out.setdefault("clean_up_tokenization_spaces", False)             # 4.x's old default rewrites " ."
    return out


def vision_token_ids(tokenizer):
    """Tokens a completion must never contain (they would be read as image slots)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)]


def stop_token_ids(model, tokenizer):
    """Token ids that end a completion: <|im_end|> and <|endoftext|> (whatever the pad token is)."""
    ids = {tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)}
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None and i >= 0)


# ---------------------------------------------------------------------------------------------
# Frames -> pixel_values (Qwen2.5-VL's image preprocessing, without torchvision)
# ---------------------------------------------------------------------------------------------

def _question_at(path, value):
    if value not in data.QUESTION_AT:
        raise ValueError(f"{path}/preprocessor_config.json: question_at={value!r}, expected one of {data.QUESTION_AT}")
    return value


@dataclass
class VisionProcessor:
    """The numbers of preprocessor_config.json that matter; resize, normalize and patchify frames."""
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 128 * 28 * 28
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    question_at: str = "after"    # where prompts put a video's question (data.QUESTION_AT); a real Qwen2.5-VL: after

    @classmethod
    def load(cls, path):
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            c = json.load(f)
        size = c.get("size") or {}
        return cls(patch_size=c.get("patch_size", 14), merge_size=c.get("merge_size", 2),
                   temporal_patch_size=c.get("temporal_patch_size", 2),
                   min_pixels=size.get("shortest_edge", c.get("min_pixels", 4 * 28 * 28)),
                   max_pixels=size.get("longest_edge", c.get("max_pixels", 128 * 28 * 28)),
                   image_mean=tuple(c.get("image_mean", cls.image_mean)),
                   image_std=tuple(c.get("image_std", cls.image_std)),
                   question_at=_question_at(path, c.get("question_at", "after")))

    def save(self, path):
        c = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
             "patch_size": self.patch_size, "merge_size": self.merge_size,
             "temporal_patch_size": self.temporal_patch_size, "min_pixels": self.min_pixels,
             "max_pixels": self.max_pixels, "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
             "image_mean": list(self.image_mean), "image_std": list(self.image_std),
             "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}
        if self.question_at != "after":  # Qwen2.5-VL's own layout goes unsaid, as in its own file
            c["question_at"] = self.question_at
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(c, f, indent=2)

    def target_size(self, height, width, max_pixels=None):
        """(height, width) in pixels the model sees: multiples of 28, area within the pixel budget."""
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels,
                            max_pixels or self.max_pixels)

    def __call__(self, frames, max_pixels=None):
        """uint8 frames (N, 3, H, W) -> pixel_values (N*h*w, 3*2*14*14), grid_thw (N, 3), (W', H')."""
        height, width = self.target_size(frames.shape[-2], frames.shape[-1], max_pixels)
        if (height, width) != tuple(frames.shape[-2:]):  # in uint8: a float copy of full-size frames is 4x larger
            frames = F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        x = frames.float()
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        x = (x / 255.0 - mean) / std                                         # (N, 3, H', W')
        x = x.unsqueeze(1).expand(-1, self.temporal_patch_size, -1, -1, -1)  # a still image fills both temporal slots
        m, p = self.merge_size, self.patch_size
        patches = rearrange(x, "n tp c (gh mh ph) (gw mw pw) -> (n gh gw mh mw) (c tp ph pw)", mh=m, mw=m, ph=p, pw=p)
        grid = torch.tensor([[1, height // p, width // p]] * frames.shape[0])
        return patches.contiguous(), grid, (width, height)


def smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28):
    """Qwen2-VL's resize rule: round each side to a multiple of `factor`, then scale into the budget."""
    if min(height, width) <= 0:
        raise ValueError(f"frame has no pixels: {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# ---------------------------------------------------------------------------------------------
# A prompt, ready for the model
# ---------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """One tokenized multimodal prompt: everything the forward needs, on one device."""
    input_ids: torch.Tensor        # (P,) long
    mm_token_type_ids: torch.Tensor  # (P,) int, 1 on image-pad tokens
    pixel_values: torch.Tensor     # (num_patches, 3*2*14*14)
    image_grid_thw: torch.Tensor   # (num_frames, 3)
    frame_size: tuple              # (width, height) pixels of the frames the model sees
    frame_times: tuple = ()        # seconds of each frame, in prompt order (model_input's; () when not a video)

    def to(self, device, dtype=None):
        pv = self.pixel_values.to(device, dtype) if dtype is not None else self.pixel_values.to(device)
        return Prompt(self.input_ids.to(device), self.mm_token_type_ids.to(device), pv,
                      self.image_grid_thw.to(device), self.frame_size, self.frame_times)

    def __len__(self):
        return self.input_ids.shape[0]


def encode_text(tokenizer, text):
    """Token ids of text that came from data or from the model: a chat token's spelling inside it
    (`<|im_end|>`, `<|image_pad|>`) stays plain text, so it can neither end a turn nor claim an
    image slot. Grounding tags (added, not special) are still one token each."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def tokenize_prompt(tokenizer, parts, frames, vision, max_pixels=None):
    """data.render_prompt's parts (text, data.Special chat tokens, int frame indices) + uint8
    frames -> Prompt.

    A Special becomes its one id, any other text goes through encode_text; each frame k becomes
    <|vision_start|>, as many <|image_pad|> as it has merged patches, <|vision_end|>. Frames are
    used in the order the parts name them.
    """
    order = [p for p in parts if isinstance(p, int)]
    pixel_values, grid, frame_size = vision(frames[order], max_pixels)
    m2 = vision.merge_size ** 2
    vs, ve, pad = (tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, IMAGE_PAD))
    ids, types, k = [], [], 0
    for part in parts:
        if isinstance(part, str):
            if isinstance(part, Special):
                piece = [tokenizer.convert_tokens_to_ids(part)]
            else:
                piece = encode_text(tokenizer, part)
            ids += piece
            types += [MM_TEXT] * len(piece)
        else:
            n = int(grid[k].prod()) // m2
            ids += [vs] + [pad] * n + [ve]
            types += [MM_TEXT] + [MM_IMAGE] * n + [MM_TEXT]
            k += 1
    return Prompt(torch.tensor(ids), torch.tensor(types, dtype=torch.int32), pixel_values, grid, frame_size)


def model_input(tokenizer, vision, video, question, max_pixels=None, turns=()):
    """What the model reads: a decoded video (data.VideoSample) and a question -> Prompt.

    The text is data.render_prompt's chat layout (each frame after `Frame i at t s:`, the question
    where the checkpoint puts it: vision.question_at); `turns` are earlier (answer, next question)
    pairs of a multi-turn conversation (eval.py's V-STAR chains).
    Chat tokens are placed by the template alone: questions and earlier answers go through
    encode_text, so text spelling `<|im_end|>` stays text. max_pixels overrides the checkpoint's
    per-frame pixel budget.
    """
    parts = data.render_prompt(question, video.times, video.duration, history=turns, question_at=vision.question_at)
    prompt = tokenize_prompt(tokenizer, parts, video.frames, vision, max_pixels)
    prompt.frame_times = tuple(float(video.times[k]) for k in (p for p in parts if isinstance(p, int)))
    return prompt


def box_cells(box, frame_size, gh, gw):
    """Row-major indices of the cells of a gh x gw grid over a frame of frame_size (W, H) pixels that a
    pixel box [x1, y1, x2, y2] touches."""
    (fw, fh), (x1, y1, x2, y2) = frame_size, box
    cols = range(min(int(x1 / fw * gw), gw - 1), min(math.ceil(x2 / fw * gw), gw))
    rows = range(min(int(y1 / fh * gh), gh - 1), min(math.ceil(y2 / fh * gh), gh))
    return [r * gw + c for r in rows for c in cols]


def _claim_box_time(ids, marks, end, decode, frame_size, tags):
    """A claim's (pixel box, seconds) from the positions of its <box>, </box>, <t> (marks) and of its
    </t> (end); None when they are out of order or either does not read."""
    _, box_open, box_close, t_open, _ = tags
    if not (box_close in marks and t_open in marks and marks.get(box_open, end) < marks[box_close] < marks[t_open]):
        return None
    _, box = data.trace_box(decode(ids[marks[box_open] + 1:marks[box_close]]), frame_size)
    try:
        t = float(decode(ids[marks[t_open] + 1:end]))
    except ValueError:
        return None
    return (box, t) if isinstance(box, list) and math.isfinite(t) else None


def claim_tags(tokenizer):
    """The ids of <obj>, <box>, </box>, <t>, </t>: what claim_rows reads a claim by."""
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in (data.OBJ_OPEN, data.BOX_OPEN, data.BOX_CLOSE,
                                                               data.T_OPEN, data.T_CLOSE))


def claim_rows(ids, prompt, tags, decode, merge=2):
    """Where each grounded claim of a target should look: [(answer indices, box tokens, frame tokens)],
    one triple per claim `<obj>name</obj><box>[x1,y1,x2,y2]</box>at<t>T</t>` in ids (think or answer):
    the indices of its tokens from the name to the time's last digit, the positions of the prompt's
    merged image tokens (row-major, merge x merge patches each) that the box touches in the frame
    shown nearest T, and the positions of all that frame's image tokens.
    Boxes are in pixels of the frame the model sees (prompt.frame_size), as SFT targets are.
    tags: the ids of <obj>, <box>, </box>, <t>, </t>; decode: ids -> text (the box's and time's).
    A claim without a box, a time or a readable box, and a prompt without frame times, give nothing."""
    grid = prompt.image_grid_thw.tolist()
    image = (prompt.mm_token_type_ids == 1).nonzero()[:, 0]
    sizes = [t * h * w // merge ** 2 for t, h, w in grid]
    if not grid or len(prompt.frame_times) != len(grid) or sum(sizes) != len(image):
        return []
    times = prompt.frame_times
    out, start, marks = [], None, {}
    for j, i in enumerate(ids):
        if i == tags[0]:                                   # <obj>: a claim may start
            start, marks = j + 1, {}
        elif start is not None and i in tags[1:4]:         # <box>, </box>, <t>: where they are
            marks.setdefault(i, j)
        elif start is not None and i == tags[4]:           # </t>: the claim is whole
            claim = _claim_box_time(ids, marks, j, decode, prompt.frame_size, tags)
            if claim is not None:
                (box, t), k = claim, min(range(len(times)), key=lambda f: abs(times[f] - claim[1]))
                cells = box_cells(box, prompt.frame_size, grid[k][1] // merge, grid[k][2] // merge)
                frame = image[sum(sizes[:k]):sum(sizes[:k + 1])]
                out.append((list(range(start, j)), frame[cells], frame))
            start = None
    return out


def claim_attention(attn, prompt, ids, tags, decode, merge=2):
    """One row's attention map attn (L, L) of a (prompt, target ids) forward -> per claim of the
    target (claim_rows), the attention mass that each position predicting one of its tokens puts on
    the claim's box and on its frame: [(box mass (n,), frame mass (n,))]."""
    out = []
    for js, box, frame in claim_rows(ids, prompt, tags, decode, merge):
        rows = attn[len(prompt) - 1 + torch.tensor(js, device=attn.device)]
        out.append((rows[:, box].sum(-1), rows[:, frame].sum(-1)))
    return out


# ---------------------------------------------------------------------------------------------
# Log-probs of completions
# ---------------------------------------------------------------------------------------------

def token_logprobs(model, hidden, targets):
    """hidden (..., D) at the positions that predict targets (...) -> log p(targets) (...)."""
    logits = model.lm_head(hidden).float()
    return -F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


def prompt_forward(model, prompt, use_cache=False):
    """The prompt alone through the model, rope positions built from mm_token_type_ids.

    Returns (model output with last_hidden_state (1, P, D) and the cache, next text position).
    """
    ids = prompt.input_ids[None]
    types = prompt.mm_token_type_ids[None]
    position_ids, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=prompt.image_grid_thw)
    out = model.model(input_ids=ids, position_ids=position_ids, pixel_values=prompt.pixel_values,
                      image_grid_thw=prompt.image_grid_thw, mm_token_type_ids=types, use_cache=use_cache)
    return out, int(position_ids.max()) + 1


def _prefill(model, prompt, grad):
    """Run the prompt once; return (cache, hidden at its last position (1, D), next text position)."""
    with torch.set_grad_enabled(grad):
        out, start = prompt_forward(model, prompt, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return cache, out.last_hidden_state[:, -1], start


def _text_positions(start, batch, length, device):
    """3D rope positions of plain text after a prompt: all three axes advance together."""
    pos = torch.arange(start, start + length, device=device)
    return pos.view(1, 1, -1).expand(3, batch, -1)


def shared_prefix_logprobs(model, prompt, completions):
    """Per-token log-probs of G completions of one prompt, the prompt run once.

    completions: (G, C) token ids (padding anywhere after a completion's end is fine: its
    log-probs are returned and the caller masks them). Returns (G, C) float32. The prompt's KV
    cache is expanded across the group; gradients flow through it into the prompt and vision.
    """
    G, C = completions.shape
    cache, last_hidden, start = _prefill(model, prompt, torch.is_grad_enabled())
    cache.batch_repeat_interleave(G)
    out = None
    if C > 1:
        positions = _text_positions(start, G, C - 1, completions.device)
        out = model.model.language_model(input_ids=completions[:, :-1], position_ids=positions, cache=cache,
                                         use_cache=True)
    hidden = last_hidden.expand(G, 1, -1)                                  # (G, 1, D) predicts token 0
    if out is not None:
        hidden = torch.cat([hidden, out.last_hidden_state], dim=1)           # (G, C, D)
    return token_logprobs(model, hidden, completions)


def plain_forward(model, prompts, completions, **outputs):
    """Each (prompt, completion) row as its own right-padded sequence through the model.

    outputs: extra output switches (output_hidden_states=True, output_attentions=True under eager
    attention). Returns (model output, mm_token_type_ids (B, L): 1 at image tokens)."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    L, B = max(lengths), len(prompts)
    device = prompts[0].input_ids.device
    ids = torch.zeros(B, L, dtype=torch.long, device=device)
    types = torch.zeros(B, L, dtype=torch.int32, device=device)
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, :lengths[b]] = torch.cat([p.input_ids, c])
        types[b, :len(p)] = p.mm_token_type_ids
        mask[b, :lengths[b]] = 1
    grid = torch.cat([p.image_grid_thw for p in prompts])
    position_ids, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask)
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                      pixel_values=torch.cat([p.pixel_values for p in prompts]), image_grid_thw=grid,
                      mm_token_type_ids=types, use_cache=False, **outputs)
    return out, types


def completion_rows(hidden, prompts, completions):
    """(B, L, D) states of plain_forward's rows -> B tensors (len(c), D) at the positions that
    predict each completion token."""
    return [hidden[b, len(p) - 1: len(p) - 1 + len(c)] for b, (p, c) in enumerate(zip(prompts, completions))]


def plain_hidden(model, prompts, completions):
    """Each (prompt, completion) row as its own right-padded sequence -> B tensors (len(c), D):
    the last hidden states at the positions that predict each completion token."""
    out, _ = plain_forward(model, prompts, completions)
    return completion_rows(out.last_hidden_state, prompts, completions)


def plain_logprobs(model, prompts, completions):
    """Reference path: each (prompt, completion) row is its own full sequence, right-padded.

    prompts: list of B Prompt; completions: list of B 1-D id tensors (lengths may differ).
    Returns a list of B tensors of per-token log-probs, one per completion token.
    Used for SFT batches (different prompts) and as the check on shared_prefix_logprobs.
    """
    hidden = plain_hidden(model, prompts, completions)
    return [token_logprobs(model, h, c) for h, c in zip(hidden, completions)]


def plain_logprobs_attention(model, prompts, completions, layer):
    """plain_logprobs, and head 0's attention weights (B, L, L) in decoder layer `layer` (1-based) of
    the same forward, for an attention aid (train.sft_loss's claim pointer; needs eager attention)."""
    out, _ = plain_forward(model, prompts, completions, output_attentions=True)
    if out.attentions is None or out.attentions[layer - 1] is None:
        raise ValueError("no attention weights returned: load the model with attn_implementation='eager'")
    hidden = completion_rows(out.last_hidden_state, prompts, completions)
    return [token_logprobs(model, h, c) for h, c in zip(hidden, completions)], out.attentions[layer - 1][:, 0]


class LogProbModule(torch.nn.Module):
    """The policy's log-prob computation as one module call, so DDP / FSDP wrappers see a forward.

    mode="shared": prompts is one Prompt, completions (G, C) -> (G, C) log-probs.
    mode="plain": lists of prompts and 1-D completions -> list of per-token log-prob tensors.
    mode="multi": lists of P prompts and P (G_i, C_i) completions -> list of P (G_i, C_i), one forward.
    mode="attention": as plain, plus head 0's attention in decoder layer `layer` (plain_logprobs_attention).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prompts, completions, mode="shared", layer=0):
        if mode == "attention":
            return plain_logprobs_attention(self.model, prompts, completions, layer)
        if mode == "shared":
            return shared_prefix_logprobs(self.model, prompts, completions)
        if mode == "multi":
            return multi_prefix_logprobs(self.model, prompts, completions)
        return plain_logprobs(self.model, prompts, completions)


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing that keeps the shared prefix's KV cache
# ---------------------------------------------------------------------------------------------

class _LayerCache:
    """What one checkpointed text layer reads and appends to instead of the model's KV cache: its
    cached keys/values as they were when the layer ran. The backward's recompute then sees the same
    prefix and does not append to the real cache a second time."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def update(self, keys, values, layer_idx, **kwargs):
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)
        self.keys, self.values = keys, values
        return keys, values


def _cached_kv(cache, idx):
    if cache is None or len(cache.layers) <= idx or not cache.layers[idx].is_initialized:
        return None, None
    return cache.layers[idx].keys, cache.layers[idx].values


def _checkpointed(layer, forward):
    """layer.forward, its activations recomputed in backward (non-reentrant torch checkpoint). The
    layer's new keys/values are outputs of the checkpointed function and are appended to the real
    cache outside it, so gradients reach the prompt through the cache as without checkpointing.
    Vision blocks have no cache: they are plainly checkpointed."""
    def run(hidden_states, *args, cache=None, **kwargs):
        if not torch.is_grad_enabled():
            return forward(hidden_states, *args, cache=cache, **kwargs)
        idx = layer.self_attn.layer_idx if cache is not None else None
        past_k, past_v = _cached_kv(cache, idx)

        def recomputable(h):
            view = _LayerCache(past_k, past_v)
            return forward(h, *args, cache=view, **kwargs), view.keys, view.values

        if cache is None:
            return torch.utils.checkpoint.checkpoint(lambda h: forward(h, *args, **kwargs), hidden_states,
                                                     use_reentrant=False)
        out, keys, values = torch.utils.checkpoint.checkpoint(recomputable, hidden_states, use_reentrant=False)
        if cache is not None:
            n = 0 if past_k is None else past_k.shape[-2]
            cache.update(keys[..., n:, :], values[..., n:, :], idx)     # (B, H, new, D) appended once
        return out
    return run


def enable_gradient_checkpointing(model):
    """Recompute the policy's activations in backward, one text layer or vision block at a time.
    Not transformers' gradient_checkpointing_enable: in training it drops the KV cache, and the
    shared-prefix path would silently lose its prompt."""
    for layer in list(model.model.language_model.layers) + list(model.model.visual.blocks):
        layer.forward = _checkpointed(layer, layer.forward)
    return model


# ---------------------------------------------------------------------------------------------
# A KV cache allocated once per generation call
# ---------------------------------------------------------------------------------------------

class SlotLayer(DynamicLayer):
    """One text layer's keys and values in buffers (R, H, capacity, D) that hold the prompt and every
    token the call may add, allocated once. A step writes its keys/values into the next free slots
    and attention reads a view of the filled slots: transformers' DynamicLayer concatenates, a copy
    of the whole cache per token and layer, and the unfilled tail here is never read."""

    def __init__(self, keys, values, filled):
        super().__init__()
        self.k_buf, self.v_buf = keys, values                              # (R, H, capacity, D)
        self.keys, self.values = keys[:, :, :filled], values[:, :, :filled]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self.k_buf.shape[-2]:
            raise ValueError(f"KV cache full: {n} cached + {m} new tokens > capacity {self.k_buf.shape[-2]}")
        self.k_buf[:, :, n:n + m] = key_states
        self.v_buf[:, :, n:n + m] = value_states
        self.keys, self.values = self.k_buf[:, :, :n + m], self.v_buf[:, :, :n + m]
        return self.keys, self.values

    def reorder_cache(self, rows):
        """Keep these rows (generation drops the prompts whose rows have all stopped)."""
        filled = self.keys.shape[-2]
        self.k_buf, self.v_buf = self.k_buf[rows], self.v_buf[rows]
        self.keys, self.values = self.k_buf[:, :, :filled], self.v_buf[:, :, :filled]


class SlotCache(Cache):
    """The text model's KV cache for one generation call: a SlotLayer per layer, the first `filled`
    slots of each buffer already written (the prompt, left-padded)."""

    def __init__(self, layers, filled):
        super().__init__(layers=[SlotLayer(k, v, filled) for k, v in layers])

    def __iter__(self):
        for layer in self.layers:
            yield layer.keys, layer.values


def _rows_with_room(kv, rows, room):
    """kv (1, H, n, D) -> a buffer (rows, H, n + room, D), each row a copy of kv, the tail unwritten."""
    buf = kv.new_empty(rows, kv.shape[1], kv.shape[2] + room, kv.shape[3])
    buf[:, :, :kv.shape[2]] = kv
    return buf


# ---------------------------------------------------------------------------------------------
# Generation: one prefill per prompt, G samples on the expanded cache
# ---------------------------------------------------------------------------------------------

def sample_next(logits, temperature=1.0, top_p=1.0, generator=None):
    """logits (G, V) -> next ids (G,). temperature 0 is greedy; top_p keeps the smallest nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(nucleus_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def nucleus_probs(logits, temperature, top_p):
    """logits (R, V) -> sampling probabilities (R, V): tempered softmax, mass outside top_p zeroed."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p                       # keep tokens until mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs


@torch.no_grad()
def generate(model, prompt, num_samples, max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0,
             generator=None, banned_ids=()):
    """Sample `num_samples` completions of one prompt.

    Returns (ids (G, C) long, mask (G, C) bool, truncated (G,) bool). mask is True on each
    completion's tokens up to and including its stop token, built from lengths, never from the
    pad id (pad may equal a stop token). truncated marks completions that hit max_new_tokens.
    banned_ids (the vision tokens, see vision_token_ids) are never sampled.
    """
    G = num_samples
    cache, last_hidden, start = _prefill(model, prompt, grad=False)
    cache = SlotCache([(_rows_with_room(k, G, max_new_tokens), _rows_with_room(v, G, max_new_tokens))
                       for k, v, _ in cache], filled=cache.get_seq_length())
    logits = model.lm_head(last_hidden).expand(G, -1)
    stop = torch.tensor(stop_ids, device=logits.device)
    out, done = [], torch.zeros(G, dtype=torch.bool, device=logits.device)
    lengths = torch.full((G,), max_new_tokens, device=logits.device)
    banned = torch.tensor(list(banned_ids), dtype=torch.long, device=logits.device)
    for step in range(max_new_tokens):
        logits = logits.index_fill(-1, banned, float("-inf")) if len(banned) else logits
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        just_done = ~done & torch.isin(nxt, stop)
        lengths = torch.where(just_done, torch.full_like(lengths, step + 1), lengths)
        done = done | just_done
        if bool(done.all()):
            break
        positions = _text_positions(start + step, G, 1, nxt.device)
        h = model.model.language_model(input_ids=nxt[:, None], position_ids=positions, cache=cache,
                                       use_cache=True).last_hidden_state
        logits = model.lm_head(h[:, -1])
    ids = torch.stack(out, dim=1)
    mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    return ids, mask, ~done


# ---------------------------------------------------------------------------------------------
# Many prompts at once: each prompt prefilled once, all groups' rows decoded (or scored) together
# ---------------------------------------------------------------------------------------------
# The one-prompt functions above stay the reference path (batch_prompts / logprob_batch = 1);
# those below give the same tokens and log-probs up to float noise, tested in tests/test_batch.py.

@dataclass
class Sampling:
    """How completions are drawn; the settings every generation call shares."""
    max_new_tokens: int
    stop_ids: list                 # ids that end a completion (kept in its mask)
    pad_id: int                    # written after a completion's end (the mask never reads it)
    temperature: float = 1.0       # 0: greedy
    top_p: float = 1.0
    banned_ids: tuple = ()         # never sampled (the vision tokens, see vision_token_ids)


def chunks(items, n):
    """Consecutive slices of at most n items (n >= 1)."""
    return [items[i:i + n] for i in range(0, len(items), max(1, n))]


def prefill_rows(model, prompts, repeats, room=None):
    """Prefill each prompt once, alone (prompt_forward, as the one-prompt path does), and give its
    cache repeats[i] rows of one cache, left-padded to the longest prompt.

    room None: a DynamicCache (scoring appends all completions at once). room n: a SlotCache with
    n free slots per row for decoding. Returns (cache, attention mask (R, L) 0 on the padding,
    hidden at the last prompt token (R, D), next text position (R,)), R = sum(repeats).
    Gradients flow through the cache when enabled.
    Prompts are not padded into one prefill forward: padding needs an (L, L) attention mask per
    prompt, and on CPU that took more time (8 prompts of 1,350 tokens: 2.7 against 2.0 CPU seconds,
    one thread) and more memory than one causal forward per prompt.
    """
    device = prompts[0].input_ids.device
    L = max(len(p) for p in prompts)
    runs = [_prefill(model, p, torch.is_grad_enabled()) for p in prompts]      # (cache, (1, D), start) each
    layers = []
    for kvs in zip(*(list(cache) for cache, _, _ in runs)):                     # one layer, every prompt
        k, v = (torch.cat([F.pad(kv[j], (0, 0, L - len(p), room or 0)).expand(n, -1, -1, -1)
                           for kv, p, n in zip(kvs, prompts, repeats)]) for j in (0, 1))  # (R, heads, L + room, d)
        layers.append((k, v))
    mask = torch.cat([(torch.arange(L, device=device) >= L - len(p)).long().expand(n, -1)
                      for p, n in zip(prompts, repeats)])                         # (R, L)
    last = torch.cat([h.expand(n, -1) for (_, h, _), n in zip(runs, repeats)])   # (R, D)
    starts = torch.tensor([start for _, _, start in runs], device=device)
    starts = starts.repeat_interleave(torch.tensor(repeats, device=device))      # (R,)
    cache = DynamicCache(layers) if room is None else SlotCache(layers, filled=L)
    return cache, mask, last, starts


def _row_positions(starts, offset, length):
    """3D rope positions of text continuing each row: starts (R,) -> (3, R, length)."""
    pos = starts[:, None] + offset + torch.arange(length, device=starts.device)[None]    # (R, length)
    return pos[None].expand(3, -1, -1)


def multi_prefix_logprobs(model, prompts, completions):
    """Per-token log-probs of several groups in one call: each prompt run once, its cache given
    its group's rows, all completions in one forward on top.

    prompts: list of P Prompt; completions: list of P (G_i, C_i) ids (G_i and C_i may differ).
    Returns a list of P (G_i, C_i) float32, equal to shared_prefix_logprobs per group up to float
    noise; gradients flow into every prompt and the vision tower.
    """
    sizes = [len(c) for c in completions]
    cache, attn, last_hidden, starts = prefill_rows(model, prompts, sizes)  # R = sum of group sizes rows
    C = max(c.shape[1] for c in completions)
    comps = torch.cat([F.pad(c, (0, C - c.shape[1])) for c in completions])  # (R, C); right filler is causal-safe
    hidden = last_hidden[:, None]                                          # (R, 1, D) predicts token 0
    if C > 1:
        attn = torch.cat([attn, attn.new_ones(len(attn), C - 1)], dim=1)   # (R, L + C - 1)
        out = model.model.language_model(input_ids=comps[:, :-1], attention_mask=attn, cache=cache, use_cache=True,
                                         position_ids=_row_positions(starts, 0, C - 1))
        hidden = torch.cat([hidden, out.last_hidden_state], dim=1)       # (R, C, D)
    logp = token_logprobs(model, hidden, comps)                           # (R, C)
    return [x[:, :c.shape[1]] for x, c in zip(logp.split(sizes), completions)]


def groups_logprobs(model, prompts, completions, logprob_batch=1):
    """Log-probs of many groups, logprob_batch groups per forward; 1 is shared_prefix_logprobs per
    group (today's path). Returns a list of (G_i, C_i).

    With gradients on, every chunk's activations live until backward: a training loop that wants
    one chunk in memory calls this on one chunk at a time and runs backward in between.
    """
    if logprob_batch <= 1:
        return [shared_prefix_logprobs(model, p, c) for p, c in zip(prompts, completions)]
    return [lp for ps, cs in zip(chunks(prompts, logprob_batch), chunks(completions, logprob_batch))
            for lp in multi_prefix_logprobs(model, ps, cs)]


def sample_groups(logits, group_size, temperature, top_p, generators=None):
    """logits (A*G, V), rows grouped by prompt -> next ids (A*G,). Each prompt's G rows are drawn
    with its own generator on a (G, V) tensor, as generate does for that prompt alone, so the
    draws do not depend on which prompts share the batch. generators None: the global RNG."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = nucleus_probs(logits, temperature, top_p)                      # (A*G, V)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs.split(group_size), generators)]
                     ).squeeze(-1)


@torch.no_grad()
def generate_batch(model, prompts, num_samples, sampling, generators=None):
    """Sample num_samples completions of each prompt: each prompt prefilled once, all rows decoded together.

    generators: one per prompt (or None). A prompt leaves the batch (its cache rows dropped) once
    all its rows have stopped, exactly where generate would stop for it alone. Returns a list, one
    (ids (G, C_i), mask (G, C_i), truncated (G,)) per prompt, as generate returns for that prompt.
    """
    P, G, S = len(prompts), num_samples, sampling
    # 1. Prefill every prompt once, then give each prompt's cache its G rows.
    cache, attn, last_hidden, starts = prefill_rows(model, prompts, [G] * P, room=S.max_new_tokens)  # R = P * G
    device = last_hidden.device
    L = attn.shape[1]
    attn = F.pad(attn, (0, S.max_new_tokens), value=1)                     # (R, L + max_new): the rows' tokens
    live = torch.arange(P * G, device=device)                              # (R,) global ids of rows still decoding
    logits = model.lm_head(last_hidden)                                    # (R, V)
    # 2. Decode: per-row stops; a prompt whose rows have all stopped leaves the batch.
    out = torch.full((P * G, S.max_new_tokens), S.pad_id, dtype=torch.long, device=device)
    lengths = torch.full((P * G,), S.max_new_tokens, device=device)
    done = torch.zeros(P * G, dtype=torch.bool, device=device)
    steps = [S.max_new_tokens] * P                                         # tokens each prompt ran for
    stop = torch.tensor(S.stop_ids, dtype=torch.long, device=device)
    banned = torch.tensor(list(S.banned_ids), dtype=torch.long, device=device)
    for step in range(S.max_new_tokens):
        logits = logits.index_fill(-1, banned, float("-inf")) if len(banned) else logits
        gens = [generators[p] for p in (live[::G] // G).tolist()] if generators is not None else None
        nxt = sample_groups(logits, G, S.temperature, S.top_p, gens)       # (R,)
        was_done = done[live]
        nxt = torch.where(was_done, torch.full_like(nxt, S.pad_id), nxt)
        out[live, step] = nxt
        just_done = ~was_done & torch.isin(nxt, stop)
        lengths[live[just_done]] = step + 1
        done[live] = was_done | just_done
        finished = done[live].view(-1, G).all(1)                           # (A,) prompts whose rows all stopped
        for p in (live[::G] // G)[finished].tolist():
            steps[p] = step + 1
        if bool(finished.all()) or step == S.max_new_tokens - 1:
            break
        if bool(finished.any()):
            keep = (~finished).repeat_interleave(G).nonzero().squeeze(1)
            cache.reorder_cache(keep)
            live, attn, nxt = live[keep], attn[keep], nxt[keep]
        h = model.model.language_model(input_ids=nxt[:, None], attention_mask=attn[:, :L + step + 1], cache=cache,
                                       use_cache=True,
                                       position_ids=_row_positions(starts[live], step, 1)).last_hidden_state
        logits = model.lm_head(h[:, -1])
    # 3. Each prompt's rows, cut where it stopped; masks from lengths (the pad id may be a stop id).
    return [_group_result(out[p * G:(p + 1) * G, :steps[p]], lengths[p * G:(p + 1) * G], done[p * G:(p + 1) * G])
            for p in range(P)]


def _group_result(ids, lengths, done):
    """ids (G, C), lengths (G,), done (G,) -> (ids, mask (G, C) bool, truncated (G,)), as generate returns."""
    mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    return ids, mask, ~done


def generate_groups(model, prompts, num_samples, sampling, generators=None, batch_prompts=1):
    """G completions of every prompt; a list of (ids, mask, truncated) in the order of prompts.

    batch_prompts = 1 runs generate prompt by prompt (today's path). n > 1 decodes up to n prompts
    together (generate_batch), grouping prompts of similar length so little padding is run; with
    per-prompt generators the tokens do not depend on the grouping (up to float noise).
    """
    gens = generators if generators is not None else [None] * len(prompts)
    S = sampling
    if batch_prompts <= 1:
        return [generate(model, p, num_samples, S.max_new_tokens, S.stop_ids, S.pad_id, S.temperature, S.top_p,
                         g, S.banned_ids) for p, g in zip(prompts, gens)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    result = [None] * len(prompts)
    for idx in chunks(order, batch_prompts):
        outs = generate_batch(model, [prompts[i] for i in idx], num_samples, sampling,
                              [gens[i] for i in idx] if generators is not None else None)
        for i, o in zip(idx, outs):
            result[i] = o
    return result
