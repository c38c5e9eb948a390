"""Wire-protocol stand-ins for services unreachable here (Anthropic, GitHub, the claude CLI)."""
