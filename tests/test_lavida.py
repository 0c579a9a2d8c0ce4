"""LaViDa: anyres layout and splicing, pooling, forward process with complementary masking,
vision computed once, EOS padding / FIM in preprocess, sampler on the system."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import shapes
from mmjax.models import anyres, siglip
from mmjax.models.llava_onevision import LlavaOnevision
from mmjax.systems.lavida import data as ld
from mmjax.systems.lavida import eval as lavida_eval
from mmjax.systems.lavida.model import pool_features

from lavida_helpers import TINY_VISION, random_params, shapes_batch, tiny_system


@pytest.fixture(scope="module")
def system():
  return tiny_system()


@pytest.fixture(scope="module")
def params(system):
  return random_params(system)


# ----------------------------------------------------------------------------- layout
def test_paper_geometry_token_counts():
  """384px views, patch 14: 27 x 27 features pooled to 14 x 14; a square image is 196 base +
  28 x 28 grid + 28 newlines = 1008 tokens; stage 1 (one view, no pooling) 729."""
  geo = ld.VisionGeometry(tile=384, patch=14)
  assert (geo.feature_grid, geo.grid, geo.max_views) == (27, 14, 5)
  views, index = geo.views(np.zeros((800, 800, 3), np.uint8))
  assert views.shape == (5, 384, 384, 3)
  assert int((index != ld.PAD_INDEX).sum()) == 196 + 784 + 28 == 1008
  assert int((index == geo.newline_index).sum()) == 28
  wide = geo.views(np.zeros((400, 1200, 3), np.uint8))[1]          # 1 x 3 grid: 14 x 42
  assert int((wide != ld.PAD_INDEX).sum()) == 196 + 14 * 43
  single = ld.VisionGeometry(tile=384, patch=14, anyres=False, pool=False)
  assert single.views(np.zeros((500, 300, 3), np.uint8))[1].shape == (729,) == (single.max_tokens,)


@pytest.mark.parametrize("size", [(32, 32), (20, 44), (44, 18), (16, 40)])
def test_gather_index_matches_llava_onevision_pack(size):
  """The host gather gives the tokens ``LlavaOnevision.pack`` builds from a static layout:
  base view, then the unpadded grid picture with a newline after each row."""
  geo = ld.VisionGeometry(tile=16, patch=4)
  image = np.random.default_rng(0).integers(0, 255, size + (3,), dtype=np.uint8)
  views, index = geo.views(image)
  layout = anyres.anyres_layout(size, geo.resolutions, geo.tile, geo.grid, max_views=None)
  feats = jax.random.normal(jax.random.key(1), (geo.max_views, geo.grid ** 2, 8))
  newline = jnp.arange(8.0)
  packed = LlavaOnevision.pack(types.SimpleNamespace(image_newline=newline),
                               feats[:layout.num_views], [layout])
  table = jnp.concatenate([feats.reshape(-1, 8), newline[None]])
  n = int((index != ld.PAD_INDEX).sum())
  np.testing.assert_array_equal(np.asarray(table[index[:n]]), np.asarray(packed))
  assert (index[n:] == ld.PAD_INDEX).all()
  assert (views[layout.num_views:] == -1).all()                    # blank (black) views


def test_spliced_sequence_layout(system, params):
  """Prompt = left pad, <bos> <user>, the image slots (base 4 + grid 4 x 4 + 4 newlines on
  the demo's 16px views), <eot> <assistant>; the spliced embeddings hold the gathered image
  tokens at the placeholders and the token embeddings elsewhere."""
  geo = system.geometry
  assert (geo.grid, geo.max_tokens) == (2, 4 + 4 * 5)
  batch = shapes_batch(system, 2)
  p, a = system.prompt_len, system.answer_len
  assert batch["tokens"].shape == (2, p + a) and p == 4 + 24
  image_id = system.model_cfg.image_token_id
  assert ((batch["tokens"][:, :p] == image_id).sum(1) == 24).all()

  @jax.jit
  def parts(params, tokens, images, index):
    apply = lambda method, *a: system.model.apply({"params": params}, *a, method=method)
    return (apply(type(system.model).embed, tokens, images, index),
            apply(type(system.model).image_tokens, images, index),
            apply(lambda m, t: m.language_model.embed(t), tokens))

  x, img, txt = (np.asarray(v) for v in parts(params, batch["tokens"], batch["images"],
                                                batch["image_index"]))
  assert x.shape == (2, p + a, 32)
  is_img = batch["tokens"] == image_id
  np.testing.assert_allclose(x[is_img], img.reshape(-1, 32))
  np.testing.assert_allclose(x[~is_img], txt[~is_img])


def test_pooling_matches_torch_bilinear():
  """27 x 27 -> 14 x 14 as LaViDa's get_2dPool (F.interpolate bilinear, align_corners=False)."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, 27 * 27, 5)).astype(np.float32)
  ours = np.asarray(pool_features(jnp.asarray(x), 14))
  t = torch.from_numpy(x).view(2, 27, 27, 5).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(t, size=(14, 14), mode="bilinear", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(2, 196, 5).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)


# ----------------------------------------------------------------------------- data
LLADA_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
              "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
              "\n\n{% endif %}")
# Dream's (Qwen2.5's) ChatML with its default system message when none is given
DREAM_CHAT = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
              "assistant.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>"
              "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_bpe(special, texts):
  """A tiny byte-level BPE tokenizer with ``special`` as added special tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=list(special),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_chat_template_matches_transformers(kind):
  """The prompt ids (image slots at LaViDa's -200 sentinel where the user turn's ``<image>``
  is, then the question) and prompt + answer + its end marker equal transformers'
  ``apply_chat_template`` of the same conversation with LaViDa's system message: LLaDA's
  LLaMA-3 headers (one ``<|startoftext|>`` although this tokenizer adds one itself), Dream's
  ChatML (LaViDa's message replaces Dream's default; answers end ``<|im_end|>\\n``). A
  tokenizer without the markers is an error."""
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  if kind == "llada":
    special = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>", "<image>"]
    template, end = LLADA_CHAT, ["<|eot_id|>"]
  else:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_middle|>", "<|fim_pad|>",
               "<image>"]
    template, end = DREAM_CHAT, ["<|im_end|>", "\n"]
  answer = "two red circles"
  tok = byte_bpe(special, [ld.LAVIDA_SYSTEM, "Describe the image.\nuser assistant system",
                           answer])
  if kind == "llada":          # LLaDA's tokenizer adds <|startoftext|> to what it encodes
    bos = tok.token_to_id("<|startoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", bos)])
    assert tok.encode("a").ids[0] == bos
  prompter = getattr(ld.Prompter, kind)(tok, question="Describe the image.")
  ids, mask = prompter.prompt(None, image_slots=3, max_text=200)
  ours = ids[mask].tolist()
  ref = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>"
                                if kind == "llada" else None)
  messages = [{"role": "system", "content": ld.LAVIDA_SYSTEM},
              {"role": "user", "content": "<image>\nDescribe the image."}]
  chat = lambda msgs, gen: ref.apply_chat_template(msgs, chat_template=template,
                                                   add_generation_prompt=gen, tokenize=True,
                                                   return_dict=False)
  image_id = tok.token_to_id("<image>")
  expand = lambda ids: [i for w in ids for i in ([ld.IMAGE_TOKEN_INDEX] * 3 if w == image_id
                                                 else [w])]
  assert ours == expand(chat(messages, True))
  if kind == "llada":
    assert ours.count(bos) == 1 and ours[0] == bos
  whole = expand(chat(messages + [{"role": "assistant", "content": answer}], False))
  answer_ids = np.concatenate(prompter.answer_words(answer)).tolist()
  assert ours + answer_ids + prompter.answer_end == whole
  assert prompter.answer_end == [t for e in end for t in tok.encode(
      e, add_special_tokens=False).ids]
  with pytest.raises(ValueError, match=r"no <\|start_header_id\|>"):
    ld.Prompter.llada(byte_bpe(["<|startoftext|>", "<|eot_id|>", "<|end_header_id|>"],
                               ["a b"]))


def test_preprocess_pads_answers_with_supervised_eos(system):
  p, a = system.prompt_len, system.answer_len
  eos = system.prompter.eos_id
  src = shapes.ShapesSource(seed=0, resolution=32)
  lengths = set()
  for i in range(20):
    rec = src[i]
    ex = system.preprocess(rec, np.random.default_rng(i))
    words = len(system.prompter.answer_words(rec["caption"]))
    n = int(ex["answer_mask"].sum())
    assert words + 1 <= n <= a                                   # answer, its EOS, extra EOS
    assert not ex["answer_mask"][:p].any()                       # the prompt is never an answer
    assert (ex["tokens"][p + words:p + n] == eos).all()
    assert (ex["slot_mask"][p:] == ex["answer_mask"][p:]).all()  # past the pad: not attended
    assert system.decode(ex["tokens"][p:]) == rec["caption"]
    lengths.add(n)
  assert len(lengths) > 3                                        # the random extra pad varies


def test_loss_pads_every_row_to_the_batch_longest(system):
  """LaViDa's collator pads a batch to its longest answer: ``pad_to_batch`` extends each row's
  supervised EOS run (tokens are EOS there already), so the slot never tells a row's length."""
  batch = shapes_batch(system, 4)
  p, eos = system.prompt_len, system.prompter.eos_id
  padded = system.pad_to_batch(batch)
  n = batch["answer_mask"].sum(1)
  assert len(set(n.tolist())) > 1
  np.testing.assert_array_equal(np.asarray(padded["answer_mask"]).sum(1), np.full(4, n.max()))
  new = np.asarray(padded["answer_mask"]) & ~batch["answer_mask"]
  assert (batch["tokens"][new] == eos).all() and not new[:, :p].any()
  np.testing.assert_array_equal(np.asarray(padded["slot_mask"])[:, p:],
                                np.asarray(padded["answer_mask"])[:, p:])


def test_random_init_draws_like_the_references(system):
  """SigLIP re-drawn as transformers' _init_weights (Xavier attention / MLP, LeCun patch
  conv, positions N(0, 1/width)); the projector as torch's nn.Linear (U(+-1/sqrt(fan_in)))."""
  params = system.init_params(jax.random.PRNGKey(0))
  v, pr = params["vision_tower"], params["projector"]
  d = system.model_cfg.vision.stack.d_model
  q = np.asarray(v["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"])
  assert np.abs(q).max() <= (6 / (2 * d)) ** 0.5 and q.std() > 0.5 * (2 / (2 * d)) ** 0.5
  np.testing.assert_allclose(np.asarray(v["pos_embed"]).std(), d ** -0.5, rtol=0.2)
  k = np.asarray(v["patch_embed_kernel"])
  np.testing.assert_allclose(k.std(), (1 / k[..., 0].size) ** 0.5 / 0.8796, rtol=0.2)
  assert not np.asarray(v["encoder"]["layers"]["self_attn"]["q_proj"]["bias"]).any()
  for name, fan_in in (("fc1", d), ("fc2", system.model_cfg.text.stack.d_model)):
    for leaf in ("kernel", "bias"):
      x = np.asarray(pr[name][leaf])
      assert np.abs(x).max() <= fan_in ** -0.5 and np.abs(x).max() > 0.8 * fan_in ** -0.5


def test_stage3_fim_markers_are_never_masked():
  system = tiny_system(preset="stage3,demo")
  batch = shapes_batch(system, 8)
  fim = batch["fim_mask"]
  assert fim.any()
  assert (batch["tokens"][fim] == system.prompter.fim_id).all()
  assert (fim <= batch["answer_mask"]).all()
  mask, _ = system.forward_masks(batch, jax.random.key(0))
  assert not np.asarray(mask)[:, fim.any(0)][np.tile(fim, (2, 1))[:, fim.any(0)]].any()


def test_long_answers_are_bad_records_and_fim_only_when_it_fits():
  """An answer longer than the answer slot is a BadRecord (never cut short); at stage 3 a
  FIM insertion that would not fit leaves that example without FIM, all words kept."""
  from mmjax.data import BadRecord
  system = tiny_system("--config.model.answer_len=6", preset="stage3,demo")
  img = shapes.ShapesSource(seed=0, resolution=64)[0]["image"]
  with pytest.raises(BadRecord, match="exceeds model.answer_len=6"):
    system.preprocess({"image": img, "caption": "two red circles left of a blue square"},
                      np.random.default_rng(0))
  pr, a = system.prompter, system.answer_len
  caption = "two red circles above"                       # 4 words + EOS: 5 of 6 slots
  want = [pr.tokenizer.token_to_id(w) for w in caption.split()]
  for seed in range(20):
    ex = system.preprocess({"image": img, "caption": caption}, np.random.default_rng(seed))
    ans = ex["tokens"][-a:]
    words = [int(t) for t in ans if t not in (pr.s_id, pr.fim_id, pr.eos_id)]
    assert words == want
    assert ex["fim_mask"].sum() == (ans == pr.fim_id).sum() <= 1


# ----------------------------------------------------------------------------- training
def test_complementary_masks_cover_every_answer_token_once(system):
  batch = shapes_batch(system, 4)
  for seed in range(5):
    mask, t = system.forward_masks(batch, jax.random.key(seed))
    mask, b = np.asarray(mask), 4
    assert mask.shape == (2 * b, batch["tokens"].shape[1])
    first, second = mask[:b], mask[b:]
    assert not (first & second).any()
    np.testing.assert_array_equal(first | second, batch["answer_mask"] & ~batch["fim_mask"])
    assert not mask[:, :system.prompt_len].any()                 # prompt and image: never
    assert first.any(1).all()                                    # at least one per row
    np.testing.assert_allclose(np.asarray(t[b:]), 1 - np.asarray(t[:b]))


def test_vision_tower_runs_once_for_the_2b_rows(system, params):
  batch = shapes_batch(system, 4)
  seen = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, siglip.SiglipVision) and context.method_name == "__call__":
      seen.append(args[0].shape)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    jax.eval_shape(system.loss, params, batch, jax.random.key(0))
  geo = system.geometry
  assert seen == [(4 * geo.max_views, geo.tile, geo.tile, 3)]


def test_loss_kinds_are_finite_and_near_log_vocab(system, params):
  llada = tiny_system("--config.model.loss=llada")
  both = jax.jit(lambda p, b, k: (system.loss(p, b, k), llada.loss(p, b, k)))
  (lavida_loss, metrics), (llada_loss, _) = both(params, shapes_batch(system, 4),
                                                 jax.random.key(0))
  assert abs(float(lavida_loss) - np.log(64)) < 1.0          # random init: about log(vocab)
  assert np.isfinite(float(llada_loss)) and float(llada_loss) > 0
  assert float(metrics["masked_tokens"]) > 0


def test_flops_count_stage1_below_stage2():
  s1, s2 = tiny_system(preset="stage1,demo"), tiny_system()
  assert 0 < s1.flops_per_step(8) < s2.flops_per_step(8)


# ----------------------------------------------------------------------------- sampling
def test_sampler_on_the_system(system, params):
  """Answers ``[b, gen_length]``; with the Prefix-DLM mask the prefix cache is exact, so it
  gives the tokens of full recomputation (here on a smaller batch: rows are independent)."""
  batch = shapes_batch(system, 3, rng=None)
  opts = system.sample_options(steps=6, block_length=6, cache="none")
  full, nfe = system.generate(params, batch, **opts)
  assert full.shape == (3, system.answer_len) and full.dtype == jnp.int32 and int(nfe) == 6
  prefix, _ = system.generate(params, {k: v[1:] for k, v in batch.items()},
                              **dict(opts, cache="prefix"))
  np.testing.assert_array_equal(np.asarray(full)[1:], np.asarray(prefix))
  thr, nfe = system.generate(params, batch, **dict(opts, threshold=0.9, cache="dual"))
  assert thr.shape == full.shape and 1 <= int(nfe) <= system.answer_len
  assert all(isinstance(system.decode(r), str) for r in np.asarray(thr))


def test_infill_on_the_system(system, params):
  """Text drafts through the system: fixed words kept in place, every hole filled with a
  non-[MASK] token, padded drafts of different lengths in one batch == one at a time; bad
  drafts are errors before anything compiles."""
  batch = shapes_batch(system, 2, rng=None)
  tok = system.prompter.tokenizer
  drafts = [["a", 2, "circle"], ["two", 3]]
  opts = system.sample_options(steps=6, block_length=6, cache="prefix")
  texts, ids = system.infill(params, batch, drafts, **opts)
  a, circle, two = (tok.token_to_id(w) for w in ("a", "circle", "two"))
  assert ids[0, 0] == a and ids[0, 3] == circle and ids[1, 0] == two
  assert (ids[0, 1:3] != system.mask_id).all() and (ids[1, 1:4] != system.mask_id).all()
  assert (ids[0, 4:] == system.prompter.eos_id).all()        # past the draft: padding
  assert texts[0].split()[0] == "a" and isinstance(texts[1], str)
  for r, d in enumerate(drafts):
    one, one_ids = system.infill(params, {k: v[r:r + 1] for k, v in batch.items()}, [d],
                                 **opts)
    np.testing.assert_array_equal(one_ids[0], ids[r])
  for bad, msg in (([["a", "circle"], ["two", 1]], "no hole"),
                   ([["a", 20], ["two", 1]], "longer than"),
                   ([["a", 0], ["two", 1]], "at least one slot"),
                   ([["a", 1]], "1 drafts for 2")):
    with pytest.raises(ValueError, match=msg):
      system.infill(params, batch, bad, **opts)
  with pytest.raises(ValueError, match="not a token id"):
    system.generate(params, batch, draft_ids=np.array([[system.mask_id, 10**6]] * 2), **opts)


def test_infill_accuracy_counts_the_holes(system, params):
  """The demo's infill rows: one hole per colour (shape) word of each reference."""
  src = shapes.ShapesSource(seed=0, resolution=system.config.data.resolution)
  refs = [src[i]["caption"] for i in range(3)]
  batch = shapes_batch(system, 3, rng=None)
  for kind, names in (("color", shapes.COLORS), ("shape", shapes.SHAPES)):
    r = lavida_eval.infill_accuracy(system, params, batch, refs, kind)
    want = sum(w.rstrip("s") in names for ref in refs for w in ref.split())
    assert r["holes"] == want > 0 and 0.0 <= r["accuracy"] <= 1.0
    assert [e["reference"] for e in r["examples"]] == refs
  line = lavida_eval.format_table({"num_scenes": 3, "gen_length": 12, "block_length": 4,
                                   "device": "cpu", "rows": [], "infill": {"color": r}})
  assert "infill: color words" in line


def test_fim_infill_strips_markers(params):
  """Stage 3 drafts end each hole with [FIM]; the output has [S] / [FIM] removed."""
  system = tiny_system(preset="stage3,demo")
  pr = system.prompter
  draft = pr.draft(["a", 3, "circle"], fim=True)
  assert draft.tolist() == [pr.tokenizer.token_to_id("a")] + [pr.mask_id] * 3 + [
      pr.fim_id, pr.tokenizer.token_to_id("circle")] + pr.answer_end
  assert pr.draft(["a", 1], complete=False).tolist() == [pr.tokenizer.token_to_id("a"),
                                                          pr.mask_id]
  batch = shapes_batch(system, 1, rng=None)
  _, ids = system.infill(params, batch, [["a", 3, "circle"]],
                         **system.sample_options(steps=4, block_length=12, cache="none"))
  assert not np.isin(ids, [pr.s_id, pr.fim_id]).any()
  assert ids[0, 0] == pr.tokenizer.token_to_id("a")


def test_dream_backbone_traces():
  """LaViDa-D: Dream's shifted logits through the same loss and sampler (shapes only)."""
  system = tiny_system("--config.model.llm_config.hidden_size=32",
                       "--config.model.llm_config.num_hidden_layers=1",
                       "--config.model.llm_config.intermediate_size=64",
                       preset="dream,demo", tiny=TINY_VISION)
  assert system.model_cfg.text.shift_logits and system.model_cfg.text.family == "dream"
  params = jax.eval_shape(lambda: nn.unbox(system.init(jax.random.PRNGKey(0),
                                                       system.dummy_batch(1))["params"]))
  batch = shapes_batch(system, 2)
  loss, _ = jax.eval_shape(system.loss, params, batch, jax.random.key(0))
  assert loss.shape == ()
  run = system.sampler(tuple(sorted(system.sample_options(cache="prefix").items())))
  p = system.prompt_len
  out, _ = jax.eval_shape(run, params, batch["tokens"][:, :p], batch["slot_mask"][:, :p],
                          batch["images"], batch["image_index"], jax.random.key(0), None, None)
  assert out.shape == (2, system.answer_len)
