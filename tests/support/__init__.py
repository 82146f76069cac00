"""Test tooling that needs dev packages (httpx, websockets): a real server process and a stream client."""
