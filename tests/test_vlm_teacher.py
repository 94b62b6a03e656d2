"""Teacher rows for a vision-language model: a tiny LLaVA (CLIP vision tower + Qwen2 text model) built offline from
configs. The teacher text of a multimodal prompt is tokenized after the prompt as rendered by the processor's chat
template, and its loss goes through the same forward as sampled rows, image features included."""

import numpy as np
import pytest
import torch
from conftest import tiny_args
from datasets import Dataset
from PIL import Image
from trl import GRPOConfig, GRPOTrainer

from luffy_trl import MixedPolicyGRPOTrainer
from luffy_trl.toy import toy_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}"
            "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_llava(seed=0):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = toy_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = TEMPLATE
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, chat_template=TEMPLATE, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor


def image_dataset(n=8):
    rows = []
    for i in range(n):
        image = Image.fromarray((np.random.RandomState(i).rand(28, 28, 3) * 255).astype("uint8"))
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": f"What is {i} + 1?"}]}],
                     "image": image, "target": [{"role": "assistant", "content": f"It is \\boxed{{{i + 1}}}."}]})
    return Dataset.from_list(rows)


def boxed(completions, **kwargs):
    return [float("boxed" in (c[0]["content"] if isinstance(c, list) else c)) for c in completions]


ARGS = dict(max_completion_length=16, remove_unused_columns=False, loss_type="grpo", entropy_coef=0.0,
            scale_rewards="none", weight_decay=0.0, lr_scheduler_type="constant")


def by_length(completions, **kwargs):
    return [float(len(c[0]["content"]) % 3) / 2 for c in completions]


def test_vlm_at_num_off_policy_zero_trains_like_stock(tmp_path):
    model, processor = tiny_llava()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    stock = GRPOTrainer(model=model, reward_funcs=by_length, processing_class=processor, train_dataset=image_dataset(),
                        args=GRPOConfig(output_dir=str(tmp_path / "s"), use_cpu=True, bf16=False,
                                        per_device_train_batch_size=8, num_generations=4, max_steps=2,
                                        learning_rate=1e-2, report_to="none", save_strategy="no", seed=0,
                                        disable_tqdm=True, **ARGS))
    stock.train()
    model, processor = tiny_llava()
    ours = MixedPolicyGRPOTrainer(model=model, reward_funcs=by_length, processing_class=processor,
                                  train_dataset=image_dataset(),
                                  args=tiny_args(tmp_path / "o", num_off_policy=0, on_policy_clip=True, **ARGS))
    ours.train()
    for (name, a), (_, b) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(start["lm_head.weight"], ours.model.lm_head.weight)  # training moved the model


def test_vlm_teacher_rows_are_tokenized_after_the_rendered_prompt_and_see_the_image(tmp_path):
    model, processor = tiny_llava()
    trainer = MixedPolicyGRPOTrainer(model=model, reward_funcs=boxed, processing_class=processor,
                                     train_dataset=image_dataset(),
                                     args=tiny_args(tmp_path, num_off_policy=1, max_steps=1, **ARGS))
    captured = []
    original = trainer._compute_loss

    def capture(model, inputs):
        captured.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        return original(model, inputs)

    trainer._compute_loss = capture
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["off_policy/fraction_of_rows"] == 0.25 and log["off_policy/tokenization_fallback"] == 0
    assert not torch.equal(before["lm_head.weight"], trainer.model.lm_head.weight)

    inputs = captured[0]
    off = inputs["is_off_policy"]
    assert off.any() and "pixel_values" in inputs
    tok = processor.tokenizer
    for row in torch.nonzero(off).flatten().tolist():  # teacher ids: the joint tokenization after the prompt text
        ids = inputs["completion_ids"][row][inputs["completion_mask"][row].bool()].tolist()
        text = tok.decode(ids[:-1])
        prompt_text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
            "type": "text", "text": "x"}]}], add_generation_prompt=True, tokenize=False)
        joint = tok(prompt_text + text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert joint[len(tok(prompt_text, add_special_tokens=False)["input_ids"]):] == ids
        assert text.startswith("It is \\boxed{")

    # Only the teacher rows' term: on-policy advantages set to 0. The loss equals −A·f(p) with p from an independent
    # forward that is given the images, and changes when the images change.
    trainer.model.train()
    inputs["advantages"] = torch.where(off, inputs["advantages"], torch.zeros_like(inputs["advantages"]))
    got = original(trainer.model, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    width = inputs["completion_ids"].size(1)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=attention, pixel_values=inputs["pixel_values"]).logits
        logp = torch.log_softmax(logits[:, -width - 1:-1].float(), -1).gather(
            -1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = inputs["completion_mask"].float()
    p = logp.exp()
    token = -inputs["advantages"].view(-1, 1) * p / (p + 0.1) * off.view(-1, 1)
    expected = ((token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    inputs["pixel_values"] = torch.zeros_like(inputs["pixel_values"])
    assert original(trainer.model, inputs).item() != pytest.approx(got.item(), rel=1e-6, abs=0)
