"""Plugin base classes. A plugin's kind is the base class it derives from, never a method name.

One request is one scheduling cycle:

    DataProducer.produce              once per request, before any profile (e.g. prefix matching)
    ProfileHandler.pick_profiles      which profiles run, in rounds
      per profile: Filter* -> Scorer* -> Picker
    PreRequest.pre_request            after the pick, off the reply path
    ResponseHeaders.response_headers  the model server's response headers arrived
    ServedElsewhere.served_elsewhere  Envoy reports that a fallback endpoint served the request
    ResponseComplete.response_complete  the response ended, or the stream went away

Plugins are built by `from_params(name, params, handle)`: it parses the `parameters` mapping
(raising ConfigError for bad values) and calls the plain constructor, so tests and code build
plugins from typed arguments and the config path shares one parser. The handle gives a plugin
its metrics, the in-flight ledger and, in `bind`, the other plugins by name.

A class may derive from several kinds (a filter that is also a scorer); the loader places it by
`isinstance` against these bases. Each class documents itself: `type_name`, its docstring, and
`parameters` (ParamDoc entries), from which docs/plugins.md is generated.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from epp.framework.cycle import CycleState, DataKey
from epp.framework.datamodel import Endpoint, InferenceRequest, ProfileResult, SchedulingResult
from epp.framework.params import Params

if TYPE_CHECKING:
    from typing import Self

    from epp.framework.handle import PluginHandle


class PluginKind(enum.Enum):
    """Kinds of plugin, as the docs and `epp --list-plugins` group them."""

    FILTER = "filter"
    SCORER = "scorer"
    PICKER = "picker"
    PROFILE_HANDLER = "profile handler"
    DATA_PRODUCER = "data producer"
    PD_DECIDER = "P/D decider"
    PARSER = "parser"
    DATA_SOURCE = "data source"
    LIFECYCLE_HOOK = "request lifecycle hook"


@dataclass(frozen=True, slots=True)
class ParamDoc:
    """One parameter of a plugin, for the generated reference."""

    name: str
    type: str  # "int", "float", "bool", "string", "list of strings", "mapping", ...
    default: str
    description: str


class Plugin:
    """Base of every plugin. `type_name` is the kebab-case name configs use."""

    type_name: ClassVar[str] = ""
    parameters: ClassVar[tuple[ParamDoc, ...]] = ()
    # Set on deprecated types: what to use instead (the loader warns; the docs say so).
    deprecated_by: ClassVar[str] = ""

    def __init__(self, name: str = "") -> None:
        self.name = name or self.type_name

    @classmethod
    def from_params(cls, name: str, params: Params, handle: PluginHandle) -> Self:
        """Parse `params` (read every key: unread ones are a config error) and build the plugin.
        The default takes no parameters."""
        return cls(name)

    def consumes(self) -> Collection[DataKey[Any]]:
        """Data keys this plugin reads from the cycle state. The loader adds the default producer
        of a key that no configured plugin produces."""
        return ()

    def producer_parameters(self, key: DataKey[Any]) -> Mapping[str, Any]:
        """Parameters for the default producer of `key` that this plugin carries (an older config
        layout put them on the consumer); the loader builds that producer with them."""
        return {}

    def bind(self, handle: PluginHandle) -> list[str]:
        """Resolve references to other plugins or profiles (`handle.plugin`, `handle.profile_names`)
        once every plugin exists, before default producers are added. Returns remarks to report;
        raises ConfigError for a dangling or wrong reference."""
        return []

    @classmethod
    def kinds(cls) -> list[PluginKind]:
        kinds = [kind for base, kind in _KIND_BASES if issubclass(cls, base)]
        if not kinds and issubclass(cls, _HOOK_BASES):
            kinds.append(PluginKind.LIFECYCLE_HOOK)
        return kinds

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# --- Scheduling ----------------------------------------------------------------------------------


class Filter(Plugin, abc.ABC):
    """Narrows the candidate list. Returning an empty list stops the profile."""

    @abc.abstractmethod
    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]: ...


class Scorer(Plugin, abc.ABC):
    """Scores each candidate in [0, 1] (one value per endpoint, same order). Synchronous, no I/O.

    The profile clamps each value into [0, 1] and multiplies it by the scorer's weight.
    """

    @abc.abstractmethod
    def score(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[float]: ...


class Picker(Plugin, abc.ABC):
    """Chooses the endpoints (primary first) from the scored candidates."""

    @abc.abstractmethod
    def pick(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], scores: Sequence[float]
    ) -> list[Endpoint]: ...


class ProfileHandler(Plugin, abc.ABC):
    """Decides which profiles run, in rounds, and which result is the primary one."""

    # How many profiles this handler can run (None: any number); the loader checks it.
    max_profiles: ClassVar[int | None] = None

    @abc.abstractmethod
    def pick_profiles(
        self,
        cycle: CycleState,
        request: InferenceRequest,
        profile_names: Sequence[str],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        """Profiles to run next given the results so far (None = ran, chose nothing); [] to stop."""

    @abc.abstractmethod
    def primary_profile(self, results: Mapping[str, ProfileResult | None]) -> str: ...

    def routing_headers(
        self, request: InferenceRequest, result: SchedulingResult
    ) -> Mapping[str, str | None] | None:
        """Request headers that carry the other profiles' outcome to the model-server side
        (value None: remove a header the client sent). None: nothing to say."""
        return None


class DataProducer(Plugin, abc.ABC):
    """Runs once per request before the profiles and publishes data in the cycle state under the
    keys `produces()` names, for scorers and filters to read. Synchronous, no I/O."""

    @abc.abstractmethod
    def produces(self) -> Collection[DataKey[Any]]: ...

    @abc.abstractmethod
    def produce(
        self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]
    ) -> None: ...


class PdDecider(Plugin, abc.ABC):
    """Decides, once the decode endpoint is picked, whether the prompt is prefilled on a separate
    prefill endpoint (P/D disaggregation). Synchronous, no I/O; reads producers' data from the cycle."""

    @abc.abstractmethod
    def disaggregate(
        self, cycle: CycleState, request: InferenceRequest, decode_endpoint: Endpoint
    ) -> bool: ...


class Parser(Plugin):
    """Turns a request body into an InferenceRequest. epp parses the OpenAI API itself; the Go
    parser types are accepted as this kind so configs naming them load."""


class DataSource(Plugin):
    """Feeds endpoint data (metrics, events). epp scrapes vLLM and SGLang metrics itself; the Go
    data-source types are accepted as this kind so configs naming them load."""


# --- Request lifecycle hooks (any plugin may add them) -------------------------------------------


class PreRequest(Plugin, abc.ABC):
    """Runs after the pick, once the reply is on its way (off the reply path)."""

    @abc.abstractmethod
    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None: ...


class ResponseHeaders(Plugin, abc.ABC):
    """The model server's response headers arrived; return headers to add to the response the
    client sees (or None). `result` is None for a request routed without scheduling (no body)."""

    @abc.abstractmethod
    def response_headers(
        self, request: InferenceRequest, result: SchedulingResult | None, endpoint: Endpoint
    ) -> Mapping[str, str] | None: ...


class ServedElsewhere(Plugin, abc.ABC):
    """Envoy reported (`envoy.lb` / `x-gateway-destination-endpoint-served`) that `served`, a
    fallback, served the request instead of the `planned` primary: move per-endpoint state."""

    @abc.abstractmethod
    def served_elsewhere(self, request: InferenceRequest, planned: Endpoint, served: Endpoint) -> None: ...


class ResponseComplete(Plugin, abc.ABC):
    """The response completed, or the stream ended; `endpoint` is the one that served."""

    @abc.abstractmethod
    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None: ...


class EndpointListener(Plugin, abc.ABC):
    """Keeps per-endpoint state: told when an endpoint leaves the pool."""

    @abc.abstractmethod
    def endpoint_removed(self, endpoint: Endpoint) -> None: ...


_KIND_BASES: tuple[tuple[type[Plugin], PluginKind], ...] = (
    (Filter, PluginKind.FILTER),
    (Scorer, PluginKind.SCORER),
    (Picker, PluginKind.PICKER),
    (ProfileHandler, PluginKind.PROFILE_HANDLER),
    (DataProducer, PluginKind.DATA_PRODUCER),
    (PdDecider, PluginKind.PD_DECIDER),
    (Parser, PluginKind.PARSER),
    (DataSource, PluginKind.DATA_SOURCE),
)
_HOOK_BASES = (PreRequest, ResponseHeaders, ServedElsewhere, ResponseComplete, EndpointListener)
