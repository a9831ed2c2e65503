"""Document templates of the synthetic corpus: short business texts that mix prose and PII.

Each topic (template family) is a list of slots; each slot holds alternative sentence patterns,
and optional slots appear with some probability, so documents of one topic vary in length,
wording and order of facts. Placeholders whose name is a PII type become exact character spans.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from datetime import date

from faker import Faker

PII_TYPES = ("name", "email", "phone", "address", "date", "iban", "credit_card", "id_number", "secret")


@dataclass
class DocumentBuilder:
    """Concatenates text pieces and records the exact `[start, end)` span of every PII value."""

    parts: list[str] = field(default_factory=list)
    spans: list[dict[str, int | str]] = field(default_factory=list)
    length: int = 0

    def text(self, value: str) -> None:
        self.parts.append(value)
        self.length += len(value)

    def pii(self, kind: str, value: str) -> None:
        if kind not in PII_TYPES:
            raise ValueError(f"unknown PII type {kind!r}; known: {', '.join(PII_TYPES)}")
        self.spans.append({"start": self.length, "end": self.length + len(value), "type": kind})
        self.text(value)

    def fill(self, pattern: str, values: dict[str, str]) -> None:
        """Append `pattern` with `{placeholder}`s replaced; a placeholder named like a PII type, or
        `<type>_<anything>` (e.g. `name_manager`), is recorded as a span of that type."""
        for literal, placeholder, _, _ in string.Formatter().parse(pattern):
            if literal:
                self.text(literal)
            if placeholder is None:
                continue
            kind = _kind(placeholder)
            if kind in PII_TYPES:
                self.pii(kind, values[placeholder])
            else:
                self.text(values[placeholder])

    def build(self) -> tuple[str, list[dict[str, int | str]]]:
        return "".join(self.parts), [dict(span) for span in self.spans]


def _kind(placeholder: str) -> str:
    """`name_manager` -> `name`; a placeholder that is itself a type (`id_number`) stays as is."""
    return placeholder if placeholder in PII_TYPES else placeholder.rsplit("_", 1)[0]


# Slot = (probability the slot appears, alternative patterns)
Slot = tuple[float, tuple[str, ...]]

TEMPLATES: dict[str, tuple[Slot, ...]] = {
    "support": (
        (
            1.0,
            (
                "Support ticket {id_number}: {name} contacted us on {date} about {issue}.",
                "On {date}, customer {name} (ticket {id_number}) reported {issue}.",
                "Case {id_number} opened {date}. Caller: {name}. Problem: {issue}.",
            ),
        ),
        (
            0.9,
            (
                "Contact details on file: {email}, {phone}.",
                "Reach the customer at {phone} or by email at {email}.",
                "Preferred channel is email ({email}); backup number {phone}.",
            ),
        ),
        (
            0.6,
            (
                "The replacement {product} ships to {address}.",
                "Shipping address confirmed as {address}.",
            ),
        ),
        (
            0.5,
            (
                "Refund of {amount} approved to account {iban}.",
                "Customer asked for the refund of {amount} to go to {iban}.",
            ),
        ),
        (
            1.0,
            (
                "Agent {name_agent} escalated the case to tier 2.",
                "Resolved by {name_agent} after a {minutes}-minute call.",
                "Follow-up scheduled; owner: {name_agent}.",
            ),
        ),
    ),
    "hr": (
        (
            1.0,
            (
                "HR note for employee {name} (ID {id_number}), {department} department.",
                "Personnel file {id_number}: {name}, {job}, {department}.",
            ),
        ),
        (
            1.0,
            (
                "Start date {date}; salary paid monthly into {iban}.",
                "Payroll account updated to {iban} effective {date}.",
                "Joined on {date} as {job}.",
            ),
        ),
        (
            0.7,
            (
                "Home address: {address}. Emergency contact: {name_contact}, {phone}.",
                "Emergency contact {name_contact} can be reached at {phone}.",
            ),
        ),
        (
            0.6,
            (
                "Performance review by {name_manager} rated the year as {rating}.",
                "{name_manager} approved {days} days of leave starting {date_leave}.",
            ),
        ),
        (
            0.5,
            (
                "Work email {email}; badge PIN {secret}.",
                "Directory entry: {email}.",
            ),
        ),
    ),
    "medical": (
        (
            1.0,
            (
                "Dear {name}, this is a reminder of your appointment with Dr. {name_doctor} on {date}.",
                "Appointment reminder: {name} is booked with Dr. {name_doctor} ({specialty}) on {date}.",
                "{name}, your {specialty} visit with Dr. {name_doctor} is scheduled for {date}.",
            ),
        ),
        (
            0.9,
            (
                "Please bring your insurance card; patient record number {id_number}.",
                "Your medical record number is {id_number}.",
            ),
        ),
        (
            0.7,
            (
                "The clinic is located at {address}.",
                "Parking is available behind the clinic at {address}.",
            ),
        ),
        (
            0.8,
            (
                "To reschedule, call {phone} or write to {email}.",
                "Questions? Call us at {phone}.",
                "We will send the lab results to {email}.",
            ),
        ),
        (0.4, ("Your patient portal one-time password is {secret}.",)),
    ),
    "invoice": (
        (
            1.0,
            (
                "Invoice {id_number} dated {date} from {company} to {name}.",
                "{company} billed {name} on {date} (invoice {id_number}).",
            ),
        ),
        (
            1.0,
            (
                "Amount due: {amount} for {quantity} x {product}.",
                "Line items: {quantity} {product} units, total {amount}.",
            ),
        ),
        (
            0.8,
            (
                "Pay by bank transfer to {iban} within 30 days.",
                "Remit to account {iban}; reference {id_number}.",
                "Card on file {credit_card} will be charged on {date_due}.",
            ),
        ),
        (
            0.7,
            (
                "Billing address: {address}.",
                "Deliver to {address}, attention {name}.",
            ),
        ),
        (
            0.5,
            (
                "Questions about this invoice: {email} or {phone}.",
                "Contact accounts receivable at {email}.",
            ),
        ),
    ),
    "it_access": (
        (
            1.0,
            (
                "IT helpdesk: {name} requested a password reset on {date}.",
                "Account recovery for {name} ({email}) started {date}.",
                "Ticket {id_number}: new laptop setup for {name}, {department}.",
            ),
        ),
        (
            1.0,
            (
                "Temporary password issued: {secret}. It expires in 24 hours.",
                "The new API token is {secret}; rotate it after the migration.",
                "VPN credentials were reset; the one-time password is {secret}.",
            ),
        ),
        (
            0.7,
            (
                "Verification call placed to {phone}.",
                "Identity confirmed by a text message to {phone}.",
            ),
        ),
        (
            0.5,
            (
                "Hardware ships to {address}.",
                "Approved by {name_manager} on {date_approval}.",
            ),
        ),
    ),
}

TOPICS = tuple(TEMPLATES)

_ISSUES = (
    "a double charge on the last statement",
    "a router that drops the connection every evening",
    "a missing parcel",
    "a broken screen on delivery",
    "an account locked after a failed login",
    "a subscription that renewed without notice",
    "slow refunds",
    "a wrong size in the order",
)
_PRODUCTS = ("headset", "router", "standing desk", "coffee grinder", "monitor", "keyboard", "e-reader")
_DEPARTMENTS = ("Finance", "Engineering", "Sales", "Operations", "Legal", "Marketing", "Research")
_SPECIALTIES = ("cardiology", "dermatology", "physiotherapy", "dental", "ophthalmology", "allergy")
_RATINGS = ("exceeds expectations", "meets expectations", "strong", "needs improvement")
_DATE_RANGE = (date(2019, 1, 1), date(2025, 12, 31))  # fixed bounds: output must not depend on today


def _format_date(fake: Faker, rng: random.Random) -> str:
    day = fake.date_between_dates(*_DATE_RANGE)
    style = rng.randrange(3)
    if style == 0:
        return day.isoformat()
    if style == 1:
        return f"{day:%B} {day.day}, {day.year}"
    return f"{day:%d/%m/%Y}"


def _secret(fake: Faker, rng: random.Random) -> str:
    style = rng.randrange(3)
    if style == 0:
        return fake.password(length=12)
    if style == 1:
        return "sk_" + "".join(rng.choices("0123456789abcdef", k=24))
    return "".join(rng.choices(string.digits, k=6))


def _value(key: str, fake: Faker, rng: random.Random, person: tuple[str, str]) -> str:
    """Generate the value of placeholder `key`; `person` is the document's main (first, last) name."""
    kind = _kind(key)
    first, last = person
    if key == "name":
        return f"{first} {last}"
    generators = {
        "name": lambda: fake.name(),
        "email": lambda: re.sub(r"[^a-z.]", "", f"{first}.{last}".lower()) + "@" + fake.free_email_domain(),
        "phone": lambda: fake.phone_number(),
        "address": lambda: fake.address().replace("\n", ", "),
        "date": lambda: _format_date(fake, rng),
        "iban": lambda: fake.iban(),
        "credit_card": lambda: fake.credit_card_number(),
        "id_number": lambda: (
            f"{rng.choice('ABCDEFHKMPRTX')}{rng.choice('ABCDEFHKMPRTX')}-{rng.randrange(10**6):06d}"
        ),
        "secret": lambda: _secret(fake, rng),
        "issue": lambda: rng.choice(_ISSUES),
        "product": lambda: rng.choice(_PRODUCTS),
        "department": lambda: rng.choice(_DEPARTMENTS),
        "specialty": lambda: rng.choice(_SPECIALTIES),
        "rating": lambda: rng.choice(_RATINGS),
        "job": lambda: fake.job(),
        "company": lambda: fake.company(),
        "amount": lambda: f"${rng.randrange(500, 500_000) / 100:,.2f}",
        "quantity": lambda: str(rng.randrange(1, 20)),
        "minutes": lambda: str(rng.randrange(3, 60)),
        "days": lambda: str(rng.randrange(1, 15)),
    }
    if kind not in generators:
        raise KeyError(f"no generator for placeholder {key!r}")
    return generators[kind]()


_PLACEHOLDER = re.compile(r"{(\w+)}")


def make_document(topic: str, fake: Faker, rng: random.Random) -> tuple[str, list[dict[str, int | str]]]:
    """One document of `topic`: its text and its PII spans (`text[start:end]` is the value)."""
    slots = TEMPLATES[topic]
    patterns = [rng.choice(options) for probability, options in slots if rng.random() < probability]
    person = (fake.first_name(), fake.last_name())
    values: dict[str, str] = {}
    for pattern in patterns:
        for key in _PLACEHOLDER.findall(pattern):
            if key not in values:
                values[key] = _value(key, fake, rng, person)
    builder = DocumentBuilder()
    for position, pattern in enumerate(patterns):
        if position:
            builder.text(" ")
        builder.fill(pattern, values)
    return builder.build()
