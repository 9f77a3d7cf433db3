"""Generation: load base + adapter for inference, turn prompts into SQL (batched or streamed).

Used by the evaluation harness (batched, greedy) and the app (streamed). Both build prompts with
`starsql.prompt.build_prompt`, the template the adapter was trained on.
"""

from collections.abc import Iterator
from threading import Event, Thread

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .modeling import resolve_model_path
from .prompt import extract_sql, first_statement_end


def statement_finished(text: str) -> bool:
    """True once `text` holds a complete SQL statement, or the model moved on to a new comment line."""
    return "\n--" in text.lstrip() or first_statement_end(text) is not None


class StopAtStatementEnd(StoppingCriteria):
    """Stop each sequence at the end of its first SQL statement (models that skip EOS run on)."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([statement_finished(t) for t in texts], device=input_ids.device)


def inference_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(base_model: str, adapter: str | None = None, load_in_4bit: bool = False, device: str | None = None):
    """(model, tokenizer) ready to generate. The adapter is merged into bf16 weights for speed,
    except on a 4-bit base, where it stays a separate LoRA layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = device or inference_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base_path = resolve_model_path(base_model)
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
        if load_in_4bit
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, quantization_config=quantization)
    if quantization is None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(adapter or base_path)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if not load_in_4bit:
            model = model.merge_and_unload()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _generation_kwargs(tokenizer, max_new_tokens: int, temperature: float = 0.0) -> dict:
    sampling = temperature > 0
    return dict(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=0.95 if sampling else None,
        top_k=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.inference_mode()
def generate_sql(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy SQL for each prompt, in order. Prompts are batched longest-first with left padding."""
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"  # decoder-only: new tokens follow the last real token
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="Generating SQL", disable=not progress):
        inputs = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(model.device)
        prompt_length = inputs["input_ids"].shape[1]
        output = model.generate(
            **inputs,
            **_generation_kwargs(tokenizer, max_new_tokens),
            stopping_criteria=StoppingCriteriaList([StopAtStatementEnd(tokenizer, prompt_length)]),
        )
        texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        for index, text in zip(batch, texts):
            results[index] = extract_sql(text)
    return results


class StopWhenSet(StoppingCriteria):
    """Stop every sequence once `event` is set: the user pressed Stop or the client went away."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_sql(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0) -> Iterator[str]:
    """Yield the generated text so far, token by token, until EOS or the end of the first statement.
    Closing the generator (Gradio does on Stop) stops the generation too, not just the stream."""
    from transformers import TextIteratorStreamer

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    prompt_length = inputs["input_ids"].shape[1]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    cancelled = Event()
    kwargs = dict(
        **inputs,
        **_generation_kwargs(tokenizer, max_new_tokens, temperature),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopAtStatementEnd(tokenizer, prompt_length), StopWhenSet(cancelled)]),
    )
    thread = Thread(target=torch.inference_mode()(model.generate), kwargs=kwargs, daemon=True, name="starsql-generate")
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        cancelled.set()
        thread.join()
