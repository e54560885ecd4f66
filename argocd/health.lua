-- Argo CD health check for modelops.dev/ModelDeployment.
-- Healthy: the stable revision serves and nothing is rolling out. Progressing: pods coming up or a
-- canary in flight. Suspended: a canary paused until promoted. Degraded: rolled back, failing, or an
-- invalid spec. Statuses older than the spec are Progressing until the operator has seen the change.
local hs = {}
local function condition(kind)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == kind then
        return c
      end
    end
  end
  return nil
end
local function message(kind, fallback)
  local c = condition(kind)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the modelops operator"
  return hs
end
if obj.metadata ~= nil and obj.metadata.generation ~= nil and
    (obj.status.observedGeneration == nil or obj.status.observedGeneration < obj.metadata.generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end
local phase = obj.status.phase
if phase == "Ready" then
  hs.status = "Healthy"
  hs.message = message("Ready", "Serving")
elseif phase == "Paused" then
  hs.status = "Suspended"
  hs.message = "Canary paused until promoted: " .. message("Progressing", "")
elseif phase == "Progressing" or phase == "Pending" then
  hs.status = "Progressing"
  hs.message = message("Progressing", message("Ready", phase))
elseif phase == "RolledBack" or phase == "Degraded" then
  hs.status = "Degraded"
  hs.message = message("Degraded", phase)
elseif phase == "InvalidSpec" then
  hs.status = "Degraded"
  hs.message = message("Ready", "Invalid spec")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
