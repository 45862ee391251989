"""Built-in ai_job_chain: speech_to_text -> llm -> text_to_speech."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from engine import Step, Workflow, WorkflowContext
from engine.builtin.adapters import AIClient

DEFAULT_INSTRUCTION = "Answer the user's request briefly."


class AIJobInput(BaseModel):
    """Audio in (base64), and the instruction the language model follows."""

    audio: str = Field(min_length=1, description="the spoken request, base64-encoded")
    instruction: str = Field(default=DEFAULT_INSTRUCTION, max_length=4000)


def ai_output(input: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """What a finished job returns: what was heard, the model's reply, and the spoken
    reply (base64, as the speech service returned it)."""
    return {
        "transcript": outputs["speech_to_text"]["transcript"],
        "reply": outputs["llm"]["completion"],
        "audio": outputs["text_to_speech"]["audio"],
    }


def ai_job_chain(ai: AIClient) -> Workflow:
    """Transcribe the audio, answer it with the language model, speak the answer."""

    async def speech_to_text(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, str]:
        return {"transcript": await ai.transcribe(input["audio"], idempotency_key=ctx.idempotency_key)}

    async def llm(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, str]:
        transcript = ctx.outputs["speech_to_text"]["transcript"]
        prompt = f"{input.get('instruction', DEFAULT_INSTRUCTION)}\n\n{transcript}"
        return {"completion": await ai.complete(prompt, idempotency_key=ctx.idempotency_key)}

    async def text_to_speech(input: dict[str, Any], ctx: WorkflowContext) -> dict[str, str]:
        completion = ctx.outputs["llm"]["completion"]
        return {"audio": await ai.speak(completion, idempotency_key=ctx.idempotency_key)}

    return Workflow(
        type="ai_job_chain",
        name="AI job chain",
        description="Speech to text, a language model, text to speech.",
        input_model=AIJobInput,
        output=ai_output,
        steps=[
            Step("speech_to_text", speech_to_text, timeout=120),
            Step("llm", llm, timeout=120),
            Step("text_to_speech", text_to_speech, timeout=120),
        ],
    )
