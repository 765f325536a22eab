"""Structured extraction tasks: a short text and a JSON Schema; the answer is the JSON object.

A task is identified by ``task_id = "<kind>/<number>"``; `task(task_id)` rebuilds its text,
schema and expected fields from the id alone (how the env scores without the ground truth).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from reference_envs.datasets import distinct_tasks, task_rng

KINDS = ("contact", "order", "event")

SCHEMAS: dict[str, dict[str, Any]] = {
    "contact": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "company": {"type": "string"},
            "email": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+\\.[a-z]+$"},
            "phone": {"type": "string"},
            "is_customer": {"type": "boolean"},
        },
        "required": ["name", "company", "email", "phone", "is_customer"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^ORD-[0-9]{5}$"},
            "item": {"type": "string"},
            "quantity": {"type": "integer", "minimum": 1},
            "total_usd": {"type": "number", "minimum": 0},
            "express_shipping": {"type": "boolean"},
        },
        "required": ["order_id", "item", "quantity", "total_usd", "express_shipping"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "description": "YYYY-MM-DD"},
            "city": {"type": "string"},
            "attendees": {"type": "integer", "minimum": 0},
        },
        "required": ["title", "date", "city", "attendees"],
        "additionalProperties": False,
    },
}

_FIRST = ["Maya", "Tomas", "Ingrid", "Kofi", "Leila", "Oskar", "Priya", "Rafael", "Sofia", "Yuki"]
_LAST = ["Andersen", "Baptiste", "Chowdhury", "Delgado", "Eriksen", "Ferreira", "Kimura", "Mensah", "Novak"]
_COMPANIES = ["Northwind Labs", "Bluefin Logistics", "Cedar & Co", "Helios Energy", "Quarry Analytics",
              "Orchid Foods", "Vector Works"]
_ITEMS = ["wireless mouse", "standing desk", "espresso machine", "hiking backpack", "desk lamp", "yoga mat",
          "noise-cancelling headphones", "cast-iron pan"]
_EVENTS = ["Open Data Meetup", "Spring Jazz Night", "Robotics Workshop", "Founders Breakfast",
           "Community Garden Day", "Python Sprint"]
_CITIES = ["Lisbon", "Nairobi", "Montreal", "Osaka", "Valencia", "Tallinn", "Auckland"]
_INSTRUCTION = ("Extract the information from the text below as one JSON object that validates against "
                "this JSON Schema.\n\nSchema:\n{schema}\n\nText:\n{text}\n\nReply with the JSON object only.")


@dataclass(frozen=True)
class ExtractionTask:
    task_id: str
    kind: str
    text: str
    schema: dict[str, Any]
    fields: dict[str, Any]

    @property
    def prompt(self) -> str:
        return _INSTRUCTION.format(schema=json.dumps(self.schema), text=self.text)


def _contact(rng: random.Random) -> tuple[str, dict[str, Any]]:
    first, last, company = rng.choice(_FIRST), rng.choice(_LAST), rng.choice(_COMPANIES)
    domain = company.lower().replace(" & ", "").replace(" ", "") + ".com"
    email = f"{first.lower()}.{last.lower()}@{domain}"
    phone = f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    customer = rng.random() < 0.5
    status = (f"They have been a customer of ours since {rng.randint(2015, 2023)}." if customer
              else "They have not bought anything from us yet.")
    text = rng.choice([
        (f"Hi team, at the fair I met {first} {last} from {company}. Please follow up by email at {email} "
         f"or call {phone}. {status}"),
        f"New lead: {first} {last} ({company}). Phone: {phone}. Email: {email}. {status} Met on a Tuesday.",
    ])
    return text, {"name": f"{first} {last}", "company": company, "email": email, "phone": phone,
                  "is_customer": customer}


def _order(rng: random.Random) -> tuple[str, dict[str, Any]]:
    order_id, item, qty = f"ORD-{rng.randint(10000, 99999)}", rng.choice(_ITEMS), rng.randint(1, 6)
    unit = rng.randint(500, 40000) / 100
    total = round(qty * unit, 2)
    express = rng.random() < 0.5
    shipping = "express (next day)" if express else "standard (5-7 business days)"
    text = rng.choice([
        (f"Thanks for your purchase! Order {order_id}: {qty} x {item} at ${unit:.2f} each. "
         f"Total charged: ${total:,.2f}. Shipping method: {shipping}."),
        (f"Your order {order_id} has shipped via {shipping} delivery. It contains {qty} {item}(s); "
         f"the amount of ${total:,.2f} was charged to your card."),
    ])
    return text, {"order_id": order_id, "item": item, "quantity": qty, "total_usd": total,
                  "express_shipping": express}


def _event(rng: random.Random) -> tuple[str, dict[str, Any]]:
    title, city, people = rng.choice(_EVENTS), rng.choice(_CITIES), rng.randint(12, 400)
    day = date(2025, 1, 1) + timedelta(days=rng.randrange(365))
    spoken = f"{day.strftime('%B')} {day.day}, {day.year}"
    text = rng.choice([
        (f"Save the date! The {title} takes place in {city} on {spoken}. We expect about {people} attendees, "
         f"up from last year."),
        f"Reminder: {people} people have registered for the {title} ({city}, {spoken}). Doors open at 6 pm.",
    ])
    return text, {"title": title, "date": day.isoformat(), "city": city, "attendees": people}


_MAKERS = {"contact": _contact, "order": _order, "event": _event}


def task(task_id: str) -> ExtractionTask:
    """Rebuild a task from its id (``"order/123"``); ValueError for an id this env never made."""
    kind, rng = task_rng("json_extract", task_id, KINDS)
    text, fields = _MAKERS[kind](rng)
    return ExtractionTask(task_id=task_id, kind=kind, text=text, schema=SCHEMAS[kind], fields=fields)


def generate(*, split: str, seed: int, n: int, kind: str | None = None) -> list[dict[str, Any]]:
    """`n` distinct tasks of `split` (all kinds mixed unless `kind` is given)."""
    tasks = distinct_tasks("json_extract", task, lambda t: t.text, kinds=KINDS, split=split, seed=seed, n=n,
                           kind=kind)
    return [{
        "messages": [{"role": "user", "content": t.prompt}],
        "ground_truth": {"schema": t.schema, "fields": t.fields},
        "metadata": {"env": "json_extract", "task_id": t.task_id, "kind": t.kind, "split": split},
    } for t in tasks]


def solution(task_row: dict[str, Any]) -> list[str | tuple[str, dict[str, Any]]]:
    """The env's own solver: the one reply of a correct episode (the expected fields as JSON)."""
    return [json.dumps(task(str(task_row["metadata"]["task_id"])).fields, ensure_ascii=False)]
