"""A router for tests: every mode with its natural options (domain bias, profile) switched on."""

from moe_rec.model.router import Router


def make_router(
    mode: str, *, d: int = 16, e: int = 6, k: int = 2, domains: int = 3, users: int = 5
) -> Router:
    return Router(
        hidden_size=d,
        num_experts=e,
        top_k=k,
        mode=mode,
        num_domains=domains,
        num_user_buckets=users,
        signal_dim=8,
        domain_expert_bias=mode != "token",
        use_profile=mode == "domain_user",
    )
