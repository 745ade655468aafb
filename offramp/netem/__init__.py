"""Network emulation: link profiles, an in-process shaping proxy, and the kernel (tc/netns) path."""
from offramp.netem.profiles import PROFILES, DeviceProfile, Direction, LinkProfile, Schedule, parse_profile, slowed
from offramp.netem.proxy import LinkProxy, LinkStats, ProxyThread

__all__ = ["PROFILES", "DeviceProfile", "Direction", "LinkProfile", "LinkProxy", "LinkStats", "ProxyThread",
           "Schedule", "parse_profile", "slowed"]
