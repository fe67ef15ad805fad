"""Evaluation entry point: run a checkpoint over a test file and score it (metrics.py).

    python eval.py --model=runs/default/rl/last --data=data/synth/test.json        # -> runs/default/eval
    python eval.py --model=runs/7b/rl/last --data=vstar.json --out_dir=runs/7b --limit=50  # -> runs/7b/eval
    torchrun --nproc_per_node=2 eval.py --model=CKPT --data=JSON          # each rank takes a shard
    python eval.py --compare A_summary.json B_summary.json ...            # one markdown table
    python eval.py --help                                                 # every field of the config

Owns inference: raw video, no visual prompt, no hint, greedy by default; each rank takes every
world-th sample and the results are gathered in the original order; rank 0 writes
{benchmark}_predictions.jsonl, {benchmark}_summary.json and {benchmark}_summary.md into --out, by
default the run's {out_dir}/eval (never into the checkpoint folder, which is what gets uploaded).
--eval_batch samples are decoded together (model.generate_groups: each prompt prefilled once,
rows decoded as one batch; 1 is one prompt at a time, and both give the same greedy answers). The
settings are the one config's (config.py): --data, --kind, --out, --limit, --max_new_tokens,
--temperature and --max_prompt_tokens are eval.py's names for eval_data, benchmark, eval_out,
eval_samples, eval_max_new_tokens, eval_temperature and eval_max_prompt_tokens; frames (--fps,
--min_frames, --max_frames, --max_pixels) are the training run's fields, read the same way
(--max_pixels=0: the checkpoint's own preprocessor_config budget). On STGR files each gold trace is
also read teacher-forced (forced_spans: can the model name what the trace is about, and box what
it has named? with --eval_pointer_layer=N and --attn_implementation=eager, also where head 0 of
layer N looks from each claim: forced_pointer/box and /frame, the claim pointer's diagnostic).
The metrics themselves are pure and live in metrics.py.

Test: python -m pytest tests/test_eval.py -q
"""
import json
import os
import sys

import torch
from tqdm import tqdm

import config
import data
import grpo
import metrics
import model
import rewards

# eval.py's flag names -> the config's fields (kept from when eval.py had its own config)
EVAL_FLAGS = {"data": "eval_data", "kind": "benchmark", "out": "eval_out", "limit": "eval_samples",
              "max_new_tokens": "eval_max_new_tokens", "temperature": "eval_temperature",
              "max_prompt_tokens": "eval_max_prompt_tokens"}


def generate_texts(vlm, tokenizer, inputs, cfg, keys):
    """One answer to each prompt in `inputs`, --eval_batch of them decoded together. Greedy by
    default; with --eval_temperature > 0 each prompt draws from its own generator, seeded from
    (seed, its key), so an answer does not depend on the batching. -> list of str."""
    how = model.Sampling(cfg.eval_max_new_tokens, model.stop_token_ids(vlm, tokenizer), tokenizer.pad_token_id,
                         cfg.eval_temperature, 1.0, tuple(model.vision_token_ids(tokenizer)))
    gens = [grpo.sample_generator(cfg.seed, "eval", *key, device=inputs[0].input_ids.device) for key in keys]
    outs = model.generate_groups(vlm, inputs, 1, how, gens, cfg.eval_batch)
    return [tokenizer.decode(ids[0][mask[0]], skip_special_tokens=True) for ids, mask, _ in outs]


def one_process():
    """The Runtime of a plain single CPU process (evaluate's default)."""
    return config.Runtime(None, torch.device("cpu"), torch.float32, 0, 1)


def _input_for(bundle, video, questions, answers, cfg, where, rt):
    """A multi-turn model input: the video with questions[0], then earlier answers and later
    questions. A prompt over eval_max_prompt_tokens is an error naming the sample (`where`)."""
    _, tokenizer, vision = bundle
    inputs = model.model_input(tokenizer, vision, video, questions[0], cfg.max_pixels or None,
                               turns=list(zip(answers, questions[1:])))
    data.check_prompt_length(len(inputs), cfg.eval_max_prompt_tokens, where)
    return inputs.to(rt.device, rt.dtype)


def my_chunks(n, cfg, rt, desc):
    """This rank's sample indices (every world-th of n), in chunks of --eval_batch, with a progress bar."""
    mine = list(range(rt.rank, n, rt.world))
    bar = tqdm(total=len(mine), desc=desc, disable=not rt.main)
    for chunk in model.chunks(mine, cfg.eval_batch):
        yield chunk
        bar.update(len(chunk))
    bar.close()


def infer_stgr(bundle, records, cfg, rt):
    """Completions for this rank's share of STGR records: [(index, completion, frame_size, forced)],
    forced: forced_spans' pairs when --eval_forced_boxes and the record's trace names or boxes
    something, else None (read from the same decoded video and prompt as the completion)."""
    vlm, tokenizer, _ = bundle
    out = []
    for chunk in my_chunks(len(records), cfg, rt, "eval"):
        videos = [data.load_video_sample(records[i], config.frames(cfg)) for i in chunk]
        inputs = [_input_for(bundle, v, [records[i]["question"]], [], cfg, data.origin(records[i]), rt)
                  for i, v in zip(chunk, videos)]
        texts = generate_texts(vlm, tokenizer, inputs, cfg, [(i,) for i in chunk])
        for i, t, v, x in zip(chunk, texts, videos, inputs):
            trace = records[i].get("reasoning_process") or ""
            forced = None
            if cfg.eval_forced_boxes and (data.BOX_OPEN in trace or data.OBJ_OPEN in trace):
                trace = data.trace_to_frame_pixels(trace, v.source_size, x.frame_size, data.origin(records[i]))
                forced = forced_spans(vlm, tokenizer, x, trace, cfg.eval_pointer_layer, bundle[2].merge_size)
            out.append((i, t, x.frame_size, forced))
    return out


def forced_spans(vlm, tokenizer, inputs, trace, pointer_layer=0, merge=2):
    """Reading given the reasoning: the gold trace (boxes in pixels of the frame the model sees) is
    fed whole after the prompt, one forward, and inside every <box>...</box> and <obj>...</obj> the
    model's argmax stands in for each gold token (each still sees the gold tokens before it). Boxes:
    can the model box an object the trace has just named, apart from whether it would have named it;
    names: can it name the object the trace is about (mostly the question's, copied from it).
    With pointer_layer (1-based; eager attention), also where head 0 of that layer looks from each
    claim's tokens (model.claim_rows): the share of its attention on the claim's box and on its frame.
    -> {"box": [(predicted text, gold text)], "obj": [...], "pointer": [(box share, frame share)]},
    one entry per span or claim, in trace order."""
    target = torch.tensor(model.encode_text(tokenizer, trace), device=inputs.input_ids.device)
    out, _ = model.plain_forward(vlm, [inputs], [target], output_attentions=pointer_layer > 0)
    hidden = model.completion_rows(out.last_hidden_state, [inputs], [target])[0]
    guess = vlm.lm_head(hidden).argmax(-1)  # guess[k] predicts target[k]
    spans = {"box": (data.BOX_OPEN, data.BOX_CLOSE), "obj": (data.OBJ_OPEN, data.OBJ_CLOSE)}
    ids, found = target.tolist(), {}
    for kind, tags in spans.items():
        opens, closes = (tokenizer.convert_tokens_to_ids(t) for t in tags)
        pairs, start = [], None
        for k, tok in enumerate(ids):
            if tok == opens:
                start = k + 1
            elif tok == closes and start is not None:
                pairs.append((tokenizer.decode(guess[start:k]), tokenizer.decode(target[start:k])))
                start = None
        found[kind] = pairs
    if pointer_layer > 0:
        attn = out.attentions[pointer_layer - 1][0, 0]                 # (L, L), head 0
        claims = model.claim_attention(attn, inputs, ids, model.claim_tags(tokenizer), tokenizer.decode, merge)
        found["pointer"] = [(box.mean().item(), frame.mean().item()) for box, frame in claims]
    return found


def infer_vstar(bundle, samples, video_root, cfg, rt):
    """Five answers per V-STAR sample: What; chain 1 When -> Where; chain 2 Where -> When.

    Batched by turn: turn 1 (What) of a chunk of samples together, then both chains' turn 2, then
    both chains' turn 3. The What turn opens both chains with the same prompt, so it is asked once
    and its answer carried into both."""
    vlm, tokenizer, _ = bundle
    out = []
    for chunk in my_chunks(len(samples), cfg, rt, "eval v-star"):
        videos, wheres = [], []
        for i in chunk:
            s, where = samples[i], f"{cfg.eval_data}: sample {i} (vid={samples[i].vid!r})"
            rec = {"id": s.vid, "_origin": where, "key_frames": [],
                   "video_path": data.resolve_media(video_root, f"videos/{s.vid}.mp4", where, "vid")}
            videos.append(data.load_video_sample(rec, config.frames(cfg)))
            wheres.append(where)

        def turn(name, questions, answers):
            """One turn of every sample in the chunk: questions(s) so far, answers(k) so far -> texts."""
            inputs = [_input_for(bundle, v, questions(samples[i]), answers(k), cfg, w, rt)
                      for k, (i, v, w) in enumerate(zip(chunk, videos, wheres))]
            return generate_texts(vlm, tokenizer, inputs, cfg, [(i, name) for i in chunk])

        said = {}  # turn -> the chunk's answers, turns in metrics.VSTAR_TURNS's order (each after those it follows)
        for name, (asked, earlier) in metrics.VSTAR_TURNS.items():
            said[name] = turn(name, lambda s: [getattr(s, q) for q in asked], lambda k: [said[t][k] for t in earlier])
        for k, (i, v) in enumerate(zip(chunk, videos)):
            answers = {name: said[name][k] for name in metrics.VSTAR_TURNS}
            out.append((i, answers, (v.frames.shape[-1], v.frames.shape[-2])))
    return out


def _video_record(row, root, keys=("video_path", "video", "videoID", "video_id")):
    """A benchmark row -> the minimal record data.load_video_sample needs (video under root)."""
    name = next(str(row[k]) for k in keys if row.get(k) not in (None, ""))
    path = name if os.path.splitext(name)[1] else name + ".mp4"
    return {"id": row.get("question_id", row.get("id", name)), "key_frames": [],
            "video_path": data.resolve_media(root, path, f"{root}: {name}", "video")}


def infer_questions(bundle, rows, root, questions, cfg, rt):
    """One completion per row for the question text `questions(row)` on the row's raw video."""
    vlm, tokenizer, _ = bundle
    out = []
    for chunk in my_chunks(len(rows), cfg, rt, "eval"):
        recs = [_video_record(rows[i], root) for i in chunk]
        inputs = [_input_for(bundle, data.load_video_sample(rec, config.frames(cfg)), [questions(rows[i])], [], cfg,
                             data.origin(rec), rt) for i, rec in zip(chunk, recs)]
        texts = generate_texts(vlm, tokenizer, inputs, cfg, [(i,) for i in chunk])
        out += [(i, t, x.frame_size) for i, t, x in zip(chunk, texts, inputs)]
    return out


def mcq_question(row):
    options = "\n".join(row["options"]) if isinstance(row["options"], list) else str(row["options"])
    return f"{row['question']}\nOptions:\n{options}\nAnswer with the option's letter."


def grounding_question(row):
    query = row.get("query", row.get("sentence"))
    return f"When does this happen: {query}? Answer as From <t>start</t>s to <t>end</t>s."


def gather_in_order(rows, world):
    """Per-rank [(index, ...)] lists -> one list sorted by index (a no-op for one process)."""
    if world > 1:
        from accelerate.utils import gather_object
        rows = gather_object(rows)
    return sorted(rows, key=lambda r: r[0])


def detect_benchmark(path):
    """vstar (temporal_question), mcq (options), tg (query / sentence), else stgr."""
    items = data.read_json(path)
    first = items[0] if isinstance(items, list) and items else {}
    if not isinstance(first, dict):
        return "stgr"
    if "temporal_question" in first:
        return "vstar"
    if "options" in first:
        return "mcq"
    return "tg" if ("query" in first or "sentence" in first) and "task" not in first else "stgr"


def evaluate(cfg, bundle, rt=None):
    """Run one checkpoint over cfg.eval_data; rank 0 writes predictions.jsonl, summary.json, summary.md.
    rt: the processes sharing the work (config.setup_runtime); one plain CPU process by default."""
    rt = rt or one_process()
    out = results_dir(cfg)
    benchmark = detect_benchmark(cfg.eval_data) if cfg.benchmark == "auto" else cfg.benchmark
    root = cfg.data_root or os.path.dirname(os.path.abspath(cfg.eval_data))
    limit = cfg.eval_samples or None
    if benchmark == "vstar":
        items = metrics.load_vstar(cfg.eval_data)[:limit]
        rows = gather_in_order(infer_vstar(bundle, items, root, cfg, rt), rt.world)
        per = [metrics.score_vstar_sample(items[i], answers, pred_size=size) for i, answers, size in rows]
        summary = metrics.vstar_summary(per)
        preds = [{"id": items[i].vid, **t, **{k: v for k, v in p.items() if k != "parsed"}}
                 for (i, t, _), p in zip(rows, per)]
    elif benchmark == "mcq":
        items = metrics.load_mcq(cfg.eval_data)[:limit]
        rows = gather_in_order(infer_questions(bundle, items, root, mcq_question, cfg, rt), rt.world)
        summary = metrics.mcq_accuracy(items, [metrics.answer_text(t) for _, t, _ in rows])
        preds = [{"id": items[i].get("question_id", i), "completion": t,
                  "letter": metrics.read_letter(metrics.answer_text(t)), "answer": items[i]["answer"]}
                 for i, t, _ in rows]
    elif benchmark == "tg":
        items = metrics.load_grounding(cfg.eval_data)[:limit]
        rows = gather_in_order(infer_questions(bundle, items, root, grounding_question, cfg, rt), rt.world)
        spans = [metrics.parse_time_span(metrics.answer_text(t)) for _, t, _ in rows]
        gts = [tuple(items[i].get("span", items[i].get("timestamp"))) for i, _, _ in rows]
        summary = metrics.temporal_grounding_metrics(spans, gts)
        summary["n"] = len(rows)
        preds = [{"id": i, "completion": t, "pred_span": p, "gt_span": g} for (i, t, _), p, g in zip(rows, spans, gts)]
    else:
        items = data.load_records(cfg.eval_data, cfg.data_root or None)[:limit]
        rows = gather_in_order(infer_stgr(bundle, items, cfg, rt), rt.world)
        ctxs = [rewards.RewardContext(frame_width=w, frame_height=h, progress=1.0) for _, _, (w, h), _ in rows]
        per = [metrics.score_stgr_sample(items[i], t, c) for (i, t, _, _), c in zip(rows, ctxs)]
        summary = metrics.stgr_summary(per)
        forced = [f for *_, f in rows if f is not None]
        summary.update(metrics.forced_box_summary([pair for f in forced for pair in f["box"]]))
        summary.update(metrics.forced_name_summary([pair for f in forced for pair in f["obj"]]))
        summary.update(metrics.forced_pointer_summary([pair for f in forced for pair in f.get("pointer", ())]))
        preds = [{"id": items[i]["id"], "completion": t, "answer": metrics.answer_text(t), "frame_size": list(size),
                  **p, **({"forced_boxes": f["box"], "forced_names": f["obj"]} if f is not None else {})}
                 for (i, t, size, f), p in zip(rows, per)]
    if rt.main:
        write_results(out, benchmark, preds, summary, cfg.model)
    return summary


def results_dir(cfg):
    """--out, else the run's {out_dir}/eval; never inside the checkpoint (its folder is what gets uploaded)."""
    out = cfg.eval_out or os.path.join(cfg.out_dir, "eval")
    model_dir = os.path.realpath(cfg.model)
    if os.path.commonpath([os.path.realpath(out), model_dir]) == model_dir:
        raise SystemExit(f"eval output {out} is inside the checkpoint {cfg.model}: pass --out (or --out_dir) "
                         f"outside it")
    return out


def write_results(out, benchmark, preds, summary, name):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{benchmark}_predictions.jsonl"), "w") as f:
        for p in preds:
            f.write(json.dumps(p, default=str) + "\n")
    with open(os.path.join(out, f"{benchmark}_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, f"{benchmark}_summary.md"), "w") as f:
        f.write(metrics.format_markdown_table({name: summary}) + "\n")


def parse_eval_args(argv):
    """The one config, read with eval.py's flag names; evaluates every sample unless --limit."""
    cfg = config.parse_args(argv, config.Config(eval_samples=0), aliases=EVAL_FLAGS, prog="eval.py")
    if not cfg.model or not cfg.eval_data:
        raise SystemExit("usage: python eval.py --model=CKPT --data=JSON [--kind=stgr|vstar|mcq|tg] [--limit=N] "
                         "| python eval.py --compare A_summary.json B_summary.json ... | python eval.py --help")
    return cfg


def main(argv):
    if argv and argv[0] == "--compare":
        print(metrics.compare_summaries(argv[1:]))
        return
    cfg = parse_eval_args(argv)
    rt = config.setup_runtime(cfg)
    bundle = model.load_policy(cfg.model, rt.device, rt.dtype, cfg.attn_implementation)
    bundle[0].eval()
    with torch.no_grad():
        summary = evaluate(cfg, bundle, rt)
    if rt.main:
        print(metrics.format_markdown_table({cfg.model: summary}))


if __name__ == "__main__":
    main(sys.argv[1:])
