"""The VLM judge: a tiny LLaVA built offline from transformers configs, and the Judge wrapper for any local VLM.

A tiny LLaVA (Liu et al. 2023: CLIP ViT -> MLP projector -> Llama decoder, image features in place of <image>
tokens) with a word-level tokenizer of the world's vocabulary, saved with save_pretrained so that it reloads
through AutoModelForImageTextToText / AutoProcessor like a hub VLM; any such local VLM can replace it
(`load_judge`). Prompt as in Dual-Process (Luo et al. 2025): question + " Answer with Yes or No."; the answer is
the next token. Two-image questions ("are these the same object ?") put two image blocks in one prompt, as
multi-image LLaVA prompts do, so each image keeps the resolution and positions it was trained with.
judges.py trains it. Images: (B, 3, H, W) in [-1, 1], the generator's range; differentiable in the pixels.
"""
import os
import re

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessorPil,
                          CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)

import questions
import world
from world import check_images

ANSWER = " Answer with Yes or No."  # Dual-Process's prompt suffix; the answer is the next token
# size / patch: the pixels the vision tower sees (the Judge resizes any input to it) and its patch side. small:
# 36 px in 12 px patches = one image token per cell of the world's 3x3 layout (9 tokens, against 16 for patch 8
# at 32 px). With vlm_lr 3e-4 (was 1e-3), `python judges.py` went from colour 0.84, position 0.63, same 0.55
# (patch 8 at 32 px) to 0.92, 0.73, 0.61; the families at chance stayed there.
VLM_PRESETS = {"tiny": dict(hidden=64, layers=2, heads=4, size=32, patch=8),
               "small": dict(hidden=128, layers=3, heads=4, size=36, patch=12)}
SPECIALS = ("<unk>", "<s>", "</s>", "<image>")
# no roles: "<s><image>... question Answer with Yes or No." (several images: several blocks, in order)
CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                 "{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")


def build_vlm(preset="small"):
    """A fresh LlavaForConditionalGeneration and its LlavaProcessor, from configs alone (nothing is downloaded)."""
    p = VLM_PRESETS[preset]
    res = p["size"]
    words = list(dict.fromkeys(world.VOCAB + questions.QUESTION_WORDS + ("yes", "answer", "or", "."))) + list(SPECIALS)
    # (<pad> is VOCAB[0])
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()  # "Answer with Yes or No." -> answer with yes or no .
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.add_special_tokens(list(SPECIALS) + ["<pad>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", words.index("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    h, layers, heads = p["hidden"], p["layers"], p["heads"]
    vision = CLIPVisionConfig(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=res, patch_size=p["patch"])
    text = LlamaConfig(vocab_size=len(words), hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=(res // p["patch"]) ** 2, vision_feature_layer=-1)
    images = CLIPImageProcessorPil(size={"shortest_edge": res}, crop_size={"height": res, "width": res},
                                   image_mean=[.5] * 3, image_std=[.5] * 3)  # so pixel_values == our [-1, 1] images
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=p["patch"],
                               chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config), processor


class Judge:
    """A VLM answering yes/no questions, differentiable in the input pixels.

    Any LLaVA-style transformers model whose processor makes pixel_values (N, 3, H, W): the processor builds the
    token ids (once per question, then cached); the pixels bypass its PIL path and are resized and normalised in
    torch with the processor's own size, image_mean and image_std. Frozen unless frozen=False (training only)."""

    def __init__(self, model, processor, frozen=True):
        self.model, self.processor, self.tok = model, processor, processor.tokenizer
        if frozen:
            model.eval().requires_grad_(False)
        ip = processor.image_processor
        self.mean, self.std = (torch.tensor(v).float().view(1, 3, 1, 1) for v in (ip.image_mean, ip.image_std))
        probe = processor(text=[self._chat("", 1)], images=[Image.new("RGB", (32, 32))], return_tensors="pt")
        if probe["pixel_values"].ndim != 4:
            raise ValueError(f"{type(model).__name__}'s processor makes pixel_values of shape "
                             f"{tuple(probe['pixel_values'].shape)}; the judge needs LLaVA-style (N, 3, H, W)")
        self.size = tuple(probe["pixel_values"].shape[-2:])
        self._dummy = Image.new("RGB", self.size[::-1])  # stands in for the images when the processor builds ids
        self.yes_id, self.no_id = (self.tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
        self._ids = {}

    def _chat(self, text, n_images):
        content = [{"type": "image"}] * n_images + ([{"type": "text", "text": text}] if text else [])
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        return self.processor.image_token * n_images + " " + text

    def _prompt(self, question, n_images):
        """Token ids (L,) of one prompt; question None: the images alone (the captioning prompt)."""
        if (question, n_images) not in self._ids:
            text = self._chat("" if question is None else question + ANSWER, n_images)
            ids = self.processor(text=[text], images=[self._dummy] * n_images, return_tensors="pt")["input_ids"][0]
            unk = self.tok.unk_token_id
            if unk is not None and (ids == unk).any():
                bad = [w for w in re.findall(r"\w+|[^\w\s]", question or "")
                       if self.tok.encode(w, add_special_tokens=False) == [unk]] + ["?"]
                raise ValueError(f"unknown word {bad[0]!r} in question {question!r} "
                                 "(this judge knows world.VOCAB, questions.QUESTION_WORDS and 'yes answer or .')")
            self._ids[question, n_images] = ids
        return self._ids[question, n_images]

    def _inputs(self, questions, n_images, tails=None):
        """Left-padded ids and attention mask (B, L): every row ends at -1. tails: token lists to append."""
        rows = [self._prompt(q, n_images) for q in questions]
        if tails is not None:
            rows = [torch.cat([r, torch.tensor(t, dtype=torch.long)]) for r, t in zip(rows, tails)]
        L, pad = max(map(len, rows)), self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids, mask = torch.full((len(rows), L), pad), torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def pixels(self, images, images2=None):
        """(B, 3, H, W) in [-1, 1] -> pixel_values (B or 2B, 3, h, w), differentiably: antialiased resize, then
        the processor's mean/std. With images2 the two images of a row are interleaved, the order of its blocks."""
        check_images(images)
        if images2 is not None:
            check_images(images2, "images2")
            if images2.shape != images.shape:
                raise ValueError(f"images2 {tuple(images2.shape)} must match images {tuple(images.shape)}")
            images = torch.stack([images, images2], 1).flatten(0, 1)
        x = (images.float() + 1) / 2  # [0, 1], what the processor's rescale makes of bytes
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return ((x - self.mean.to(x.device)) / self.std.to(x.device)).to(self.model.dtype)

    def logits(self, images, questions, images2=None, keep=1):
        """Logits (B, keep, vocab) of the last `keep` positions (0: all) and the ids (B, L) they came from."""
        pixel_values = self.pixels(images, images2)
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions for {len(images)} images")
        ids, mask = self._inputs(questions, 1 if images2 is None else 2)
        out = self.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, logits_to_keep=keep)
        return out.logits.float(), ids

    def log_probs(self, images, questions, images2=None):
        """(B, vocab) log-probabilities of the token after the prompt: the answer."""
        return self.logits(images, questions, images2)[0][:, -1].log_softmax(-1)

    def log_p_yes(self, images, questions, images2=None):
        """log p("Yes" | images, question + " Answer with Yes or No.") (B,), differentiable in the images."""
        return self.log_probs(images, questions, images2)[:, self.yes_id]

    @torch.no_grad()
    def answer(self, images, questions, images2=None):
        """(B,) bool: is "Yes" likelier than "No"? (curation, evaluation)"""
        lp = self.log_probs(images, questions, images2)
        return lp[:, self.yes_id] > lp[:, self.no_id]

    def loss(self, images, questions, answers, images2=None):
        """The Dual-Process loss: -log p(answer token), averaged. answers: (B,) bool, True = "Yes"."""
        target = torch.where(torch.as_tensor(answers, dtype=torch.bool, device=images.device), self.yes_id, self.no_id)
        return -self.log_probs(images, questions, images2).gather(1, target[:, None]).mean()


def load_judge(path, device="cpu"):
    """Any local transformers image-text-to-text model + processor (e.g. this project's VLM) as a frozen Judge."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"{path} is not a saved transformers model (no config.json)")
    try:
        model, processor = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise SystemExit(f"{path} is not an image-text-to-text model with a processor: {str(e).splitlines()[0]}") \
            from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise SystemExit(f"{path}: its processor lacks an image processor or a tokenizer, so it is not a VLM")
    return Judge(model.to(device), processor)
