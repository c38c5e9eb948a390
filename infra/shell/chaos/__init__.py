"""``ccc chaos``: the fault suite that proves nothing is lost or duplicated, with figures."""
