"""Which workflow types a process serves, and on which adapters: read from the settings."""

from __future__ import annotations

import importlib.util

from pydantic import SecretStr

from daemon.settings import ConfigurationError, Settings
from engine import Registry
from engine.builtin import Adapters, builtin_workflows, sandbox_adapters
from engine.builtin.adapters import Exchange, Notifier
from engine.builtin.http_clients import (
    JsonRpc,
    JsonRpcChain,
    LocalKeySigner,
    OpenAICompatibleAI,
    RemoteSigner,
    RestExchange,
    RestNotifier,
    Signer,
)


def load_registry(settings: Settings) -> Registry:
    """The built-in types (unless turned off) and the definitions of WORKFLOWD_MODULES."""
    registry = Registry(builtin_workflows(build_adapters(settings)) if settings.builtins else ())
    registry.load_modules(settings.modules)
    return registry


def build_adapters(settings: Settings) -> Adapters:
    """The outside services of the built-in types, as WORKFLOWD_ADAPTERS chooses.

    With `http`, the chain and the AI service are real; the exchange and the notifier
    are real when their URLs are set, else they stay sandboxes (the daemon says so).
    """
    sandboxes = sandbox_adapters(settings.sandbox_latency_ms / 1000, settings.sandbox_failure_rate)
    if settings.adapters == "sandbox":
        return sandboxes
    required = {
        "WORKFLOWD_CHAIN_RPC_URL": settings.chain_rpc_url,
        "WORKFLOWD_CHAIN_PRIVATE_KEY or WORKFLOWD_CHAIN_DEPLOYER": settings.chain_private_key
        or settings.chain_deployer,
        "WORKFLOWD_AI_BASE_URL": settings.ai_base_url,
        "WORKFLOWD_AI_API_KEY": settings.ai_api_key,
        **_key_of("WORKFLOWD_EXCHANGE", settings.exchange_url, settings.exchange_api_key),
        **_key_of("WORKFLOWD_NOTIFIER", settings.notifier_url, settings.notifier_api_key),
    }
    if missing := [name for name, value in required.items() if not value]:
        raise ConfigurationError("WORKFLOWD_ADAPTERS=http needs " + ", ".join(missing))
    assert settings.ai_base_url  # checked above
    assert settings.ai_api_key
    ai = OpenAICompatibleAI(
        settings.ai_base_url,
        settings.ai_api_key.get_secret_value(),
        chat_model=settings.ai_chat_model,
        transcription_model=settings.ai_transcription_model,
        speech_model=settings.ai_speech_model,
        timeout=settings.http_timeout,
    )
    exchange: Exchange = sandboxes.exchange
    if settings.exchange_url and settings.exchange_api_key:
        key = settings.exchange_api_key.get_secret_value()
        exchange = RestExchange(settings.exchange_url, key, timeout=settings.http_timeout)
    notifier: Notifier = sandboxes.notifier
    if settings.notifier_url and settings.notifier_api_key:
        key = settings.notifier_api_key.get_secret_value()
        notifier = RestNotifier(settings.notifier_url, key, timeout=settings.http_timeout)
    return Adapters(chain=_chain(settings), exchange=exchange, ai=ai, notifier=notifier, kind="http")


def _key_of(prefix: str, url: str | None, key: SecretStr | None) -> dict[str, object]:
    """A service that is optional, but needs its API key once its URL is set."""
    return {f"{prefix}_API_KEY (with {prefix}_URL)": key} if url else {}


def _chain(settings: Settings) -> JsonRpcChain:
    assert settings.chain_rpc_url  # build_adapters checked it
    if importlib.util.find_spec("eth_account") is None:
        raise ConfigurationError(
            "signing deployments needs eth-account: pip install 'stellara-workflows[chain]'"
        )
    rpc = JsonRpc(settings.chain_rpc_url, timeout=settings.http_timeout)
    signer: Signer
    if settings.chain_private_key:
        try:
            signer = LocalKeySigner(settings.chain_private_key.get_secret_value())
        except ValueError as error:
            raise ConfigurationError(f"WORKFLOWD_CHAIN_PRIVATE_KEY is not a private key: {error}") from None
    else:
        assert settings.chain_deployer  # build_adapters checked it
        signer_rpc = rpc
        if settings.chain_signer_url:
            signer_rpc = JsonRpc(settings.chain_signer_url, timeout=settings.http_timeout)
        signer = RemoteSigner(signer_rpc, settings.chain_deployer)
    return JsonRpcChain(rpc, signer, settings.chain_deployer)
