// A TypeScript client's first lines, type-checked (never run) by
// scripts/ts-client-check against the code protoc-gen-es generates from
// proto/ into ./gen (gitignored; ./node_modules links to .tools/). An import
// that no longer resolves, a renamed message or a service whose method types
// drift from its messages fails the check.

import {
  create,
  createRegistry,
  fromBinary,
  getOption,
  toBinary,
  toJson,
  type DescMessage,
  type JsonValue,
} from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";

import {
  GetCapsuleRequestSchema,
  RegistryService,
  type GetCapsuleRequest,
} from "./gen/ts/anumate/registry/v1/registry_pb.js";
import {
  CompilerService,
  ExecutablePlanSchema,
  GetPlanRequestSchema,
} from "./gen/ts/anumate/compiler/v1/compiler_pb.js";
import { cloudevent_type, key, topic } from "./gen/ts/anumate/events/v1/options_pb.js";
import { file_anumate_events_v1_capsule_events } from "./gen/ts/anumate/events/v1/capsule_events_pb.js";
import { file_anumate_events_v1_plan_events } from "./gen/ts/anumate/events/v1/plan_events_pb.js";
import { file_anumate_events_v1_policy_events } from "./gen/ts/anumate/events/v1/policy_events_pb.js";
import { http } from "./gen/ts/google/api/annotations_pb.js";
import { HttpBodySchema } from "./gen/ts/google/api/httpbody_pb.js";

/** A request built from its schema round-trips through the wire format. */
export function getCapsuleRequest(name: string): GetCapsuleRequest {
  const request = create(GetCapsuleRequestSchema, { name });
  return fromBinary(GetCapsuleRequestSchema, toBinary(GetCapsuleRequestSchema, request));
}

/** The service descriptor's method types are the generated message schemas. */
export const getCapsuleInput: typeof GetCapsuleRequestSchema = RegistryService.method.getCapsule.input;
export const getPlanInput: typeof GetPlanRequestSchema = CompilerService.method.getPlan.input;

/** The REST path of an RPC, from its google.api.http option (generated from the vendored file). */
export function restPath(): string | undefined {
  const rule = getOption(RegistryService.method.getCapsule, http);
  return rule.pattern.case === "get" ? rule.pattern.value : undefined;
}

/** A stored plan printed as proto3 JSON (what the plan hash is computed over). */
export function planJson(bytes: Uint8Array): JsonValue {
  return toJson(ExecutablePlanSchema, fromBinary(ExecutablePlanSchema, bytes));
}

/** One event message's CloudEvents type, topic and Kafka key fields, from the event options. */
export interface EventType {
  cloudEventType: string;
  topic: string;
  keyFields: string[];
  message: DescMessage;
}

/** The event registry a consumer decodes CloudEvent data with, keyed by CloudEvents type. */
export function eventTypes(): Map<string, EventType> {
  const registry = createRegistry(
    file_anumate_events_v1_capsule_events,
    file_anumate_events_v1_plan_events,
    file_anumate_events_v1_policy_events,
  );
  const types = new Map<string, EventType>();
  for (const desc of registry) {
    if (desc.kind !== "message") continue;
    const type = getOption(desc, cloudevent_type);
    if (type === "") continue;
    types.set(type, {
      cloudEventType: type,
      topic: getOption(desc, topic),
      keyFields: desc.fields.filter((f) => getOption(f, key)).map((f) => f.name),
      message: desc,
    });
  }
  return types;
}

/** google.api.HttpBody (JWKS documents) and a well-known type from @bufbuild/protobuf. */
export const jwksBody = create(HttpBodySchema, {
  contentType: "application/json",
  data: new TextEncoder().encode("{\"keys\":[]}"),
});
export const now = timestampFromDate(new Date(0));
