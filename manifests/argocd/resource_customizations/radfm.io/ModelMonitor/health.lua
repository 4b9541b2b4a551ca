-- Argo CD health of a radfm.io resource, read from the kstatus conditions the radfm operator
-- writes on every kind (Ready, Reconciling, Stalled; see radfm's docs/health.md):
-- Stalled=True is Degraded, Reconciling=True is Progressing, Ready of reason Suspended is
-- Suspended, Ready=True is Healthy; anything else, or a generation not yet observed, is
-- Progressing.
local hs = { status = "Progressing", message = "Waiting for the radfm operator" }
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.message = "Waiting for the radfm operator to observe generation " .. generation
  return hs
end
local conditions = {}
for _, condition in ipairs(obj.status.conditions or {}) do
  conditions[condition.type] = condition
end
local function is_true(condition)
  return condition ~= nil and condition.status == "True"
end
local function describe(condition)
  if condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return condition.reason or ""
end
local ready = conditions["Ready"]
if is_true(conditions["Stalled"]) then
  hs.status = "Degraded"
  hs.message = describe(conditions["Stalled"])
elseif is_true(conditions["Reconciling"]) then
  hs.status = "Progressing"
  hs.message = describe(conditions["Reconciling"])
elseif ready ~= nil and ready.reason == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(ready)
elseif is_true(ready) then
  hs.status = "Healthy"
  hs.message = describe(ready)
end
return hs
