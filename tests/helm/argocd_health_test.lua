-- Tests of the Argo CD health check for ComputeJob (manifests/argocd/computejob-health.lua).
--
--   lua5.4 tests/helm/argocd_health_test.lua manifests/argocd/computejob-health.lua
--
-- Runs the script the way Argo CD does (the object as the global `obj`, the returned table
-- read for status and message) on fixture objects. Works under Lua 5.1 too, the dialect
-- Argo CD's interpreter speaks. Prints "N passed, N failed"; exits non-zero on a failure.
local script = arg[1] or "manifests/argocd/computejob-health.lua"

local function job(status, extra)
  local o = {
    apiVersion = "kiln.dev/v1alpha1",
    kind = "ComputeJob",
    metadata = { name = "wordcount", namespace = "default", generation = 1 },
    spec = { executors = { count = 2 } },
    status = status,
  }
  for k, v in pairs(extra or {}) do
    o[k] = v
  end
  return o
end

local function cond(type_, status, reason, message)
  return { type = type_, status = status, reason = reason, message = message }
end

local cases = {
  { name = "no status yet", obj = job(nil), want = "Progressing", message = "Waiting for the operator" },
  { name = "empty status", obj = job({}), want = "Progressing", message = "pending" },
  { name = "pending", obj = job({ phase = "Pending", observedGeneration = 1 }), want = "Progressing" },
  {
    name = "running with progress",
    obj = job({
      phase = "Running",
      observedGeneration = 1,
      progress = { stagesDone = 2, stages = 3, tasksDone = 40, tasks = 48 },
      conditions = { cond("Progressing", "True", "Running", "4 of 4 executors running") },
    }),
    want = "Progressing",
    message = "2/3 stages done",
  },
  {
    name = "running while recovering from a lost executor",
    obj = job({
      phase = "Running",
      observedGeneration = 1,
      conditions = { cond("Degraded", "True", "ExecutorLost", "executor exec-2 lost; recomputing 12 partitions") },
    }),
    want = "Progressing",
    message = "recomputing 12 partitions",
  },
  {
    name = "succeeded",
    obj = job({
      phase = "Succeeded",
      observedGeneration = 1,
      conditions = { cond("Succeeded", "True", "JobSucceeded", "3 stages, 48 tasks") },
    }),
    want = "Healthy",
    message = "3 stages, 48 tasks",
  },
  { name = "succeeded without conditions", obj = job({ phase = "Succeeded" }), want = "Healthy" },
  {
    name = "failed",
    obj = job({
      phase = "Failed",
      observedGeneration = 1,
      conditions = {
        cond("Succeeded", "False", "JobFailed", ""),
        cond("Failed", "True", "TooManyExecutorLosses", "21 executor losses exceed maxExecutorLosses 20"),
      },
    }),
    want = "Degraded",
    message = "21 executor losses",
  },
  {
    name = "failed with only a reason",
    obj = job({ phase = "Failed", conditions = { cond("Failed", "True", "InvalidSpec", nil) } }),
    want = "Degraded",
    message = "InvalidSpec",
  },
  {
    name = "no phase but a true Failed condition",
    obj = job({ conditions = { cond("Failed", "True", "DriverFailed", "driver exited 1") } }),
    want = "Degraded",
  },
  {
    name = "no phase but a true Succeeded condition",
    obj = job({ conditions = { cond("Succeeded", "True", "JobSucceeded", "done") } }),
    want = "Healthy",
  },
  {
    name = "a false Failed condition while running",
    obj = job({ phase = "Running", conditions = { cond("Failed", "False", "", "") } }),
    want = "Progressing",
  },
  {
    name = "suspended by spec",
    obj = job({ phase = "Running", observedGeneration = 1 }, { spec = { suspend = true } }),
    want = "Suspended",
  },
  { name = "suspended phase", obj = job({ phase = "Suspended", observedGeneration = 1 }), want = "Suspended" },
  {
    name = "succeeded, but the spec changed since",
    obj = job({ phase = "Succeeded", observedGeneration = 1 }, {
      metadata = { name = "wordcount", namespace = "default", generation = 2 },
    }),
    want = "Progressing",
    message = "observe generation 2",
  },
  {
    name = "failed, but the spec changed since",
    obj = job({ phase = "Failed", observedGeneration = 2 }, {
      metadata = { name = "wordcount", namespace = "default", generation = 3 },
    }),
    want = "Progressing",
  },
  {
    name = "observed generation current",
    obj = job({ phase = "Failed", observedGeneration = 3 }, {
      metadata = { name = "wordcount", namespace = "default", generation = 3 },
    }),
    want = "Degraded",
  },
}

local valid = { Healthy = true, Progressing = true, Degraded = true, Suspended = true, Missing = true, Unknown = true }

local function run(o)
  local chunk = assert(loadfile(script, "t", setmetatable({ obj = o }, { __index = _G })))
  if setfenv then -- Lua 5.1: loadfile takes no environment
    setfenv(chunk, setmetatable({ obj = o }, { __index = _G }))
  end
  return chunk()
end

local passed, failed = 0, 0
for _, c in ipairs(cases) do
  local ok, hs = pcall(run, c.obj)
  local problem = nil
  if not ok then
    problem = "error: " .. tostring(hs)
  elseif type(hs) ~= "table" then
    problem = "returned " .. type(hs)
  elseif not valid[hs.status] then
    problem = "invalid status " .. tostring(hs.status)
  elseif hs.status ~= c.want then
    problem = "status " .. hs.status .. ", want " .. c.want .. " (message: " .. tostring(hs.message) .. ")"
  elseif type(hs.message) ~= "string" or hs.message == "" then
    problem = "no message"
  elseif c.message ~= nil and not string.find(hs.message, c.message, 1, true) then
    problem = "message " .. string.format("%q", hs.message) .. " lacks " .. string.format("%q", c.message)
  end
  if problem then
    failed = failed + 1
    print("FAIL " .. c.name .. ": " .. problem)
  else
    passed = passed + 1
    print("ok   " .. c.name .. " -> " .. hs.status .. ": " .. hs.message)
  end
end
print(passed .. " passed, " .. failed .. " failed")
if failed > 0 then
  os.exit(1)
end
