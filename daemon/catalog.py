"""Which workflow types a process serves, and on which adapters: read from the settings."""

from __future__ import annotations

from daemon.settings import ConfigurationError, Settings
from engine import Registry
from engine.builtin import Adapters, builtin_workflows, sandbox_adapters
from engine.builtin.http_clients import JsonRpcChain, OpenAICompatibleAI


def load_registry(settings: Settings) -> Registry:
    """The built-in types (unless turned off) and the definitions of WORKFLOWD_MODULES."""
    registry = Registry(builtin_workflows(build_adapters(settings)) if settings.builtins else ())
    registry.load_modules(settings.modules)
    return registry


def build_adapters(settings: Settings) -> Adapters:
    """The outside services of the built-in types, as WORKFLOWD_ADAPTERS chooses.

    With `http`, the chain and the AI service are real; the exchange and the notifier
    have no HTTP adapter yet and stay sandboxes (the daemon says so at start).
    """
    sandboxes = sandbox_adapters(settings.sandbox_latency_ms / 1000, settings.sandbox_failure_rate)
    if settings.adapters == "sandbox":
        return sandboxes
    url, deployer, ai_url, ai_key = (
        settings.chain_rpc_url,
        settings.chain_deployer,
        settings.ai_base_url,
        settings.ai_api_key,
    )
    if not (url and deployer and ai_url and ai_key):
        names = (
            "WORKFLOWD_CHAIN_RPC_URL",
            "WORKFLOWD_CHAIN_DEPLOYER",
            "WORKFLOWD_AI_BASE_URL",
            "WORKFLOWD_AI_API_KEY",
        )
        missing = [
            name for name, value in zip(names, (url, deployer, ai_url, ai_key), strict=True) if not value
        ]
        raise ConfigurationError("WORKFLOWD_ADAPTERS=http needs " + ", ".join(missing))
    chain = JsonRpcChain(url, deployer, timeout=settings.http_timeout)
    ai = OpenAICompatibleAI(
        ai_url,
        ai_key.get_secret_value(),
        chat_model=settings.ai_chat_model,
        transcription_model=settings.ai_transcription_model,
        speech_model=settings.ai_speech_model,
        timeout=settings.http_timeout,
    )
    return Adapters(chain=chain, exchange=sandboxes.exchange, ai=ai, notifier=sandboxes.notifier, kind="http")
