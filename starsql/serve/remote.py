"""A backend on an OpenAI-compatible completions endpoint: vLLM, TGI, `transformers serve`, an Inference Endpoint.

The app keeps its prompt, checks and UI and sends the prompt (the template the adapter was trained on, as
plain text) to `POST {url}/completions`, streamed. The endpoint serves the base with the adapter, for
example vLLM's `--enable-lora --lora-modules sql=USER/starcoder2-3b-sql` and `model="sql"` here. Imported
only when the app is given an endpoint (`INFERENCE_URL`).
"""

from collections.abc import Iterator

from .decode import BackendError, statement_finished

ENDPOINT_CONCURRENCY = 8  # answers in flight at once; an engine batches them, so more than one GPU stream
ENDPOINT_TIMEOUT_S = 60.0  # to connect, and between two streamed pieces


def _api_base(url: str) -> str:
    """The OpenAI client's base URL: the endpoint's own, with `/v1` added when it was left out."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class RemoteBackend:
    """A backend (see starsql.serve.decode) that streams completions from an OpenAI-compatible endpoint."""

    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = ENDPOINT_CONCURRENCY,
                 timeout: float = ENDPOINT_TIMEOUT_S):
        from openai import OpenAI

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"The inference endpoint must be an http:// or https:// URL, not {url!r}.")
        if concurrency < 1:
            raise ValueError(f"The endpoint's concurrency must be at least 1, not {concurrency}.")
        self.url, self.model, self.concurrency = url, model, concurrency
        # No retries: a user waits for this answer; a failed request is reported, not repeated behind their back.
        self.client = OpenAI(base_url=_api_base(url), api_key=api_key or "not-needed", timeout=timeout, max_retries=0)

    def stream(self, prompt: str, max_new_tokens: int, temperature: float = 0.0) -> Iterator[str]:
        """The text so far, piece by piece, up to the end of the first statement. Closing the generator closes
        the connection, which vLLM and TGI take as the end of the request."""
        if max_new_tokens <= 0:
            return
        import openai

        sampling = temperature > 0
        text, response = "", None
        try:
            response = self.client.completions.create(
                model=self.model, prompt=prompt, max_tokens=max_new_tokens, stream=True,
                temperature=temperature if sampling else 0.0, top_p=0.95 if sampling else 1.0,
            )  # fmt: skip
            for chunk in response:
                if chunk.choices and chunk.choices[0].text:
                    text += chunk.choices[0].text
                    yield text
                    if statement_finished(text):
                        return
        except openai.APITimeoutError as error:
            raise BackendError(f"The inference endpoint {self.url} did not answer in time; try again later.") from error
        except openai.APIConnectionError as error:
            raise BackendError(f"Cannot reach the inference endpoint {self.url}: is it running?") from error
        except openai.APIStatusError as error:
            raise BackendError(
                f"The inference endpoint {self.url} refused the request (HTTP {error.status_code}: "
                f"{_short(error.message)}). Check INFERENCE_URL, INFERENCE_MODEL ({self.model!r}) and INFERENCE_API_KEY."
            ) from error
        except openai.APIError as error:  # an error sent inside the stream, after it began
            raise BackendError(f"The inference endpoint {self.url} failed while answering: {_short(error.message)}") from error
        finally:
            if response is not None:
                response.close()

    def usage(self) -> dict | None:
        """The endpoint's /usage figures, if it is starsql.serve.engine_server (the model's own process behind
        WORKERS); None from any other endpoint, or one that does not answer at once."""
        import httpx

        root = self.url.rstrip("/").removesuffix("/v1")
        try:
            response = httpx.get(f"{root}/usage", timeout=2.0)
            usage = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return usage if isinstance(usage, dict) and "tokens" in usage else None


def _short(message: str, limit: int = 200) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[:limit] + "…"
