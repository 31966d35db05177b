-- Argo CD health check for kiln.dev/ComputeJob.
--
-- Install it as the argocd-cm key `resource.customizations.health.kiln.dev_ComputeJob`
-- (manifests/argocd/argocd-cm.yaml carries it ready to merge). Argo CD runs it with the
-- live object as the global `obj`, in a Lua 5.1 interpreter, and reads `hs.status` and
-- `hs.message` from the returned table.
--
--   Healthy      status.phase Succeeded (or a Succeeded condition that is True)
--   Degraded     status.phase Failed (or a Failed condition that is True)
--   Suspended    spec.suspend is true, or status.phase Suspended
--   Progressing  everything else: no status yet, Pending, Running, or the operator has
--                not yet observed the latest spec (status.observedGeneration behind
--                metadata.generation)
hs = {}

local function condition(status, type_)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "The job is suspended"
  return hs
end

if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the job"
  return hs
end

if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
local failed = condition(status, "Failed")
local succeeded = condition(status, "Succeeded")

if phase == "Failed" or (phase == nil and is_true(failed)) then
  hs.status = "Degraded"
  hs.message = describe(failed, "The job failed")
  return hs
end

if phase == "Succeeded" or (phase == nil and is_true(succeeded)) then
  hs.status = "Healthy"
  hs.message = describe(succeeded, "The job succeeded")
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "The job is suspended"
  return hs
end

hs.status = "Progressing"
local progressing = condition(status, "Progressing")
local degraded = condition(status, "Degraded")
local message = "The job is " .. string.lower(phase or "pending")
if status.progress ~= nil and status.progress.stages ~= nil and status.progress.stages > 0 then
  message = message .. ": " .. tostring(status.progress.stagesDone or 0) .. "/" .. tostring(status.progress.stages) .. " stages done"
end
if is_true(degraded) then
  -- Still running (e.g. recomputing what a lost executor held): not yet a failure.
  message = message .. " (" .. describe(degraded, "degraded") .. ")"
elseif progressing ~= nil and progressing.message ~= nil and progressing.message ~= "" then
  message = message .. " (" .. progressing.message .. ")"
end
hs.message = message
return hs
