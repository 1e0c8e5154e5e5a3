"""Ollama ``Modelfile``s: one beside a merged GGUF file (``FROM ./model.gguf`` with the chat template), one beside a
GGUF LoRA adapter (``FROM <base>`` plus ``ADAPTER ./adapter.gguf``).

An adapter's base is the Ollama library model of the same weights when the model is one of the studio's presets
(its ``ollama:`` field, e.g. ``qwen2.5:7b-instruct-q4_K_M``); for any other model the Modelfile names a GGUF of
the base model the user converts, and says so in a comment.
"""
from __future__ import annotations

_CHATML = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
           "<|im_start|>assistant\n")
_LLAMA3 = ("{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
           "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
_INST = ("{{- range $i, $m := .Messages }}{{- if eq $m.Role \"user\" }}[INST] "
         "{{ if and $.System (eq $i 0) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }} [/INST]"
         "{{- else if eq $m.Role \"assistant\" }} {{ $m.Content }}</s>{{- end }}{{- end }}")


def ollama_template(chat_template: str | None) -> tuple[str | None, list[str]]:
    """The Modelfile TEMPLATE (Go template syntax) and stop words matching a Jinja chat template's family."""
    t = chat_template or ""
    if "<|im_start|>" in t:
        return _CHATML, ["<|im_start|>", "<|im_end|>"]
    if "<|start_header_id|>" in t:
        return _LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    if "[INST]" in t:
        return _INST, ["[INST]", "[/INST]", "</s>"]
    return None, []


def modelfile(gguf_name: str, chat_template: str | None, system: str | None = None) -> str:
    template, stops = ollama_template(chat_template)
    lines = ["# Ollama: ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}", ""]
    if template:
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ["# No TEMPLATE: this chat template has no known Ollama equivalent; Ollama reads the GGUF's",
                  "# tokenizer.chat_template when it recognises it. Write a TEMPLATE here otherwise.", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def library_name(name_or_path: str) -> str | None:
    """The Ollama library name of a preset model (by preset key, hub id, Unsloth id or the bundled id), else None."""
    from studio.config import presets

    preset = presets.find_model(name_or_path)
    return preset.get("ollama") if preset is not None else None


def adapter_modelfile(adapter_name: str, base_model: str, chat_template: str | None,
                      base_gguf: str | None = None) -> str:
    """A Modelfile that applies the GGUF LoRA adapter ``adapter_name`` to its base model in Ollama."""
    library = library_name(base_model)
    lines = ["# Ollama: ollama create my-model -f Modelfile && ollama run my-model",
             f"# The LoRA adapter trained on {base_model}, applied to that model by Ollama."]
    if base_gguf:
        lines += [f"FROM {base_gguf}"]
    elif library:
        lines += [f"# {library} is Ollama's build of {base_model} (pulled on first use); its 16-bit tag",
                  "# (…-fp16) is closer to the weights the adapter was trained on, the 4-bit one fits an 8 GB card.",
                  f"FROM {library}"]
    else:
        lines += [f"# {base_model} has no Ollama library name the studio knows: FROM must be a GGUF file of exactly",
                  "# this base model, e.g. converted with llama.cpp's convert_hf_to_gguf.py (any type: f16, q8_0,",
                  "# q4_k_m). Put its path here:",
                  "FROM ./base-model.gguf"]
    lines += [f"ADAPTER ./{adapter_name}", ""]
    template, stops = ollama_template(chat_template)
    if template and not library:
        lines += [f'TEMPLATE """{template}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
