"""What LLaVA is asked, and how it decodes: the model id, the instruction, :class:`LlavaGeneration` (one generation
config of the sweep), the llava-1.5 prompt around an instruction, and the answer's clean-up."""
from __future__ import annotations

from dataclasses import dataclass

REAL_MODEL_ID = "llava-hf/llava-1.5-7b-hf"
DEFAULT_INSTRUCTION = "Describe this image in one sentence."

CACHES = ("dynamic", "static", "static+compile", "static+graphs")


@dataclass(frozen=True)
class LlavaGeneration:
    """A generation config for ``model.generate``: greedy (default), beam search, or seeded sampling."""

    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0  # sampling only
    # KV cache: "dynamic" (grows by concatenation), "static" (preallocated), "static+compile" (transformers compiles
    # the decoding step), "static+graphs" (greedy: the one-token steps replayed from a CUDA graph, .decoding)
    cache: str = "dynamic"

    def __post_init__(self):
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(map(repr, CACHES))}, got {self.cache!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) is more than max_new_tokens "
                             f"({self.max_new_tokens}): no answer could satisfy both")
        if self.length_penalty != self.length_penalty or abs(self.length_penalty) == float("inf"):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaGeneration":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown generation setting(s) {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def generate_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, num_beams=self.num_beams,
                  do_sample=self.do_sample, length_penalty=self.length_penalty,
                  repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:  # keep generation_config.json's sampling defaults from leaking into greedy / beam search
            kw.update(temperature=None, top_p=None, top_k=None)
        if self.num_beams > 1:
            kw["early_stopping"] = True
        if self.cache != "dynamic":  # a preallocated cache: no copy of the whole cache per step; compile is opt-in
            kw.update(cache_implementation="static", disable_compile=self.cache != "static+compile")
        return kw

    @property
    def label(self) -> str:
        if self.do_sample:
            name = f"sample T={self.temperature:g}" + (f" p={self.top_p:g}" if self.top_p < 1 else "")
        else:
            name = "greedy" if self.num_beams == 1 else f"beam {self.num_beams}"
        extras = [f"{k}={v}" for k, v in (("len_pen", self.length_penalty), ("no_repeat", self.no_repeat_ngram_size),
                                          ("rep_pen", self.repetition_penalty)) if v not in (1.0, 0)]
        extras += [self.cache] if self.cache != "dynamic" else []
        return " ".join([name, *extras])


def postprocess(text: str, first_sentence: bool = False) -> str:
    """Strip whitespace; optionally keep only the first sentence (up to and including its full stop)."""
    text = " ".join(text.split())
    if first_sentence:
        for i, ch in enumerate(text):
            if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
                return text[: i + 1]
    return text




def build_prompt(processor, instruction: str) -> str:
    """The llava-1.5 conversation for one image and one instruction, through the processor's chat template
    (``USER: <image>\\n{instruction} ASSISTANT:``)."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {processor.image_token}\n{instruction} ASSISTANT:"


