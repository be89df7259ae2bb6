"""Helpers shared by the unit and integration tests: fake and delegating engines, and polling."""
