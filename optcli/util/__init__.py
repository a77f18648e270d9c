"""Small dependency-free helpers (nothing of optcli's but its errors), so any layer may import them."""
