"""``meshagent status``: sections contributed by the core and the plugins, and their rendering.

The wording follows ``cilium status`` so its users find things where they expect them.
"""

import enum

import attrs

# Sections appear in this order; others follow alphabetically.
SECTION_ORDER = ("KVStore", "Kubernetes", "ClusterMesh", "Datapath", "Policy", "Endpoints",
                 "Controllers", "Plugins")


class Health(enum.Enum):
    OK = "Ok"
    WARNING = "Warning"
    FAILURE = "Failure"
    DISABLED = "Disabled"


@attrs.frozen
class StatusSection:
    """One line of the short status, plus detail lines shown with ``--verbose``."""

    name: str
    health: Health
    summary: str
    details: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    plugin: str = ""


@attrs.frozen
class StatusReport:
    version: str
    cluster_name: str
    cluster_id: int
    node_name: str
    uptime_seconds: float
    ready: bool
    sections: tuple[StatusSection, ...]

    @property
    def healthy(self) -> bool:
        return not any(s.health is Health.FAILURE for s in self.sections)


def sort_sections(sections: list[StatusSection]) -> list[StatusSection]:
    def key(section: StatusSection) -> tuple[int, str]:
        try:
            return SECTION_ORDER.index(section.name), ""
        except ValueError:
            return len(SECTION_ORDER), section.name
    return sorted(sections, key=key)


def render_text(report: StatusReport, verbose: bool) -> str:
    width = max([len(s.name) for s in report.sections] + [len("Cluster")]) + 2
    state = "Ok" if report.healthy else "Failure"
    lines = [
        f"{'Agent:':<{width}}{state:<10}meshagent {report.version}, node {report.node_name},"
        f" up {_duration(report.uptime_seconds)}{'' if report.ready else ', not ready yet'}",
        f"{'Cluster:':<{width}}{report.cluster_name} (id {report.cluster_id})",
    ]
    for section in report.sections:
        head = f"{section.name + ':':<{width}}{section.health.value:<10}{section.summary}"
        lines.append(head.rstrip())
        if verbose:
            lines.extend(f"   {detail}" for detail in section.details)
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m"
