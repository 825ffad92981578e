"""Workflows the OpenAPI fuzzing serves (tests/api/test_openapi.py): quick ones, typed with nested
models, so every route can be called thousands of times and each call ends within ?wait."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from genx_ray import component, workflow


class Item(BaseModel):
    sku: str = Field(min_length=1, max_length=20)
    qty: int = Field(ge=1, le=1000)


class Order(BaseModel):
    customer: str = Field(min_length=1, max_length=50)
    items: list[Item] = Field(min_length=1, max_length=20)
    priority: Literal["low", "high"] = "low"


class Quote(BaseModel):
    customer: str
    units: int
    rush: bool


@component
async def count_units(items: list[Item]) -> int:
    return sum(i.qty for i in items)


@workflow(name="quote")
async def quote(order: Order) -> Quote:
    """Price an order: how many units, and whether it is rushed."""
    units = await count_units(order.items)
    return Quote(customer=order.customer, units=units, rush=order.priority == "high")


@workflow(name="shout")
async def shout(text: str = Field(max_length=100)) -> str:
    """Shout the text back."""
    return text.upper()
