"""Render examples through the tokenizer's chat template into input ids and loss labels.

One conversation is rendered once with the chat template and tokenized once without the
tokenizer's own special tokens, so a template that writes BOS never gets a second one (a double
BOS cost a published eval several points). Each assistant turn's character span is found by
rendering the conversation up to that turn with and without the reply; tokens are labelled by
their character offsets. A reply is supervised through its end-of-turn token (EOS for the model):
without it the model never learns to stop. Nothing here relies on ``{% generation %}`` markers,
which the stock Llama-3.1 template does not have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lora_exp.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Turn terminators used by common chat templates; the tokenizer's EOS is always one of them.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "</s>", "<|end_of_text|>")

# Meta's chat template of Llama-3.1 (Instruct) as published in its tokenizer_config.json; also
# selectable with ``data.chat_template=llama3_1`` for a tokenizer that has none (e.g. a base model copy).
LLAMA_3_1_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    '{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}\n'
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n\n"
    "{#- System message + builtin tools #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    "{%- if builtin_tools is defined or tools is not none %}\n"
    '    {{- "Environment: ipython\\n" }}\n'
    "{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    "{%- endif %}\n"
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a '
    'function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n\n'
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user "
    'message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    "{%- endif %}\n\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- endif %}\n"
    "                {%- endfor %}\n"
    '            {{- ")" }}\n'
    "        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    '            {{- "}" }}\n'
    "        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n"
    "            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n'
    "        {%- else %}\n"
    '            {{- "<|eot_id|>" }}\n'
    "        {%- endif %}\n"
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHAT_TEMPLATES = {"llama3_1": LLAMA_3_1_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}


@dataclass
class Encoded:
    """One tokenized example: ids, labels (``-100`` = unsupervised) and what truncation cut."""

    input_ids: list[int]
    labels: list[int]
    full_length: int  # tokens before truncation
    truncated: bool
    spans: list[tuple[int, int]] = field(default_factory=list)  # supervised token ranges before truncation

    @property
    def n_supervised(self) -> int:
        """Tokens the loss sees: label set, and not the first position (it is never a target)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def resolve_chat_template(name: str | None, tokenizer) -> str | None:
    """The Jinja template to render with: a preset name, a literal template, or the tokenizer's own."""
    if not name:
        return tokenizer.chat_template
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    if "{{" in name or "{%" in name:
        return name
    raise DataError(
        f"data.chat_template={name!r}: neither a preset ({', '.join(sorted(CHAT_TEMPLATES))}) nor a Jinja template"
    )


class Renderer:
    """Turns normalized examples (``{"messages": [...]}`` or ``{"text": ...}``) into ``Encoded`` rows.

    Args:
        tokenizer: a fast HF tokenizer (offsets are needed to label tokens).
        max_seq_len: longer examples are truncated (and counted by the caller).
        train_on_prompt: supervise every token, not just the assistant replies.
        chat_template: ``None`` for the tokenizer's own template, a preset name or a Jinja string.
    """

    def __init__(self, tokenizer, max_seq_len: int, train_on_prompt: bool = False, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.train_on_prompt = train_on_prompt
        self.template = resolve_chat_template(chat_template, tokenizer)
        self.bos_id = tokenizer.bos_token_id
        # Does this model expect a BOS in front of every sequence? The tokenizer says so by adding one.
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        vocab = tokenizer.get_vocab()
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
        self.stop_strings = stops + [t for t in END_OF_TURN_TOKENS if t in vocab and t not in stops]
        self.stop_ids = {vocab[t] for t in self.stop_strings if t in vocab}
        self.warned_no_eos = False

    # ---- rendering -------------------------------------------------------------------------------
    def _apply(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.template:
            raise DataError(
                "the tokenizer has no chat template: set data.chat_template to a preset "
                f"({', '.join(sorted(CHAT_TEMPLATES))}) or a Jinja string, or use data.format=text"
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template
        )

    def render_prompt(self, messages: list[dict]) -> str:
        """The conversation so far plus the header that opens the assistant's reply (for generation)."""
        return self._apply(messages, add_generation_prompt=True)

    def render_chat(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of every assistant reply + its end-of-turn token."""
        text = self._apply(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._prefix(messages[:i])
            upto = self._apply(messages[: i + 1])
            if not (text.startswith(upto) and upto.startswith(prefix)):
                raise DataError(
                    "the chat template renders a conversation differently from its prefixes (it rewrites "
                    f"earlier turns), so assistant turn {i} cannot be located; set data.chat_template"
                )
            start = len(prefix)
            content = str(message["content"]).strip()
            found = upto.find(content, start) if content else -1
            content_end = found + len(content) if found >= 0 else start
            end = self._end_of_turn(upto, content_end)
            # from the reply itself: a template whose generation prompt is empty would otherwise
            # put the role header ("assistant: ") into the supervised part
            spans.append((found if found >= 0 else start, end))
        return text, spans

    def _prefix(self, messages: list[dict]) -> str:
        """The conversation before a reply, with the assistant header the template opens replies with."""
        try:
            return self._apply(messages, add_generation_prompt=True)
        except DataError:
            raise
        except Exception:  # some templates cannot render an empty conversation (a reply comes first)
            if messages:
                raise
            return ""

    def _end_of_turn(self, upto: str, content_end: int) -> int:
        """Where a reply's supervision ends: just after the first end-of-turn token that follows it."""
        hits = [(p, s) for s in self.stop_strings if (p := upto.find(s, content_end)) >= 0]
        if hits:
            pos, stop = min(hits)
            return pos + len(stop)
        if not self.warned_no_eos:
            log.warning(
                "the chat template writes no end-of-turn token (%s) after assistant replies: the model will "
                "not learn to stop",
                self.tokenizer.eos_token,
            )
            self.warned_no_eos = True
        return len(upto)

    # ---- tokenizing ------------------------------------------------------------------------------
    def encode(self, example: dict) -> Encoded:
        """Tokenize one normalized example and label it; truncation to ``max_seq_len`` is recorded."""
        if "text" in example:
            text = example["text"] + (self.tokenizer.eos_token or "")
            spans = [(0, len(text))]
        else:
            text, spans = self.render_chat(example["messages"])
        bos = self.tokenizer.bos_token
        if self.adds_bos and not text.startswith(bos):
            text = bos + text  # the template (or plain text) lacks the BOS this model expects
            spans = [(s + len(bos), e + len(bos)) for s, e in spans]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            raise DataError("the rendered example starts with two BOS tokens (template and data both add one)")
        labels = [IGNORE_INDEX] * len(ids)
        token_spans = []
        for s, e in spans:
            inside = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < e and b > s]  # overlaps the span
            if inside:
                token_spans.append((inside[0], inside[-1] + 1))
        for j in range(len(ids)):
            if self.train_on_prompt or any(a <= j < b for a, b in token_spans):
                labels[j] = ids[j]
        labels[0] = IGNORE_INDEX  # the first token is never a target (BOS included)
        n = len(ids)
        return Encoded(ids[: self.max_seq_len], labels[: self.max_seq_len], n, n > self.max_seq_len, token_spans)

    def check(self, row: Encoded) -> None:
        """Raise if a row breaks an invariant the loss relies on (cheap: runs on every example)."""
        ids, labels = row.input_ids, row.labels
        if self.adds_bos and ids[0] != self.bos_id:
            raise DataError(f"an example does not start with BOS {self.tokenizer.bos_token!r}")
        if labels[0] != IGNORE_INDEX:
            raise DataError("the first token of an example is supervised")
        if self.warned_no_eos or not self.stop_ids:
            return  # already warned: this template has no end-of-turn token to supervise
        for _a, b in row.spans:
            if b <= len(ids) and (ids[b - 1] not in self.stop_ids or labels[b - 1] == IGNORE_INDEX):
                raise DataError(
                    f"a reply is not supervised through an end-of-turn token ({', '.join(self.stop_strings)})"
                )
